"""
The rule language of the C{rules} check: rules written in TOML, compiled
once into matchers (L{pfxpold.rules.conditions}) and ordered rule sets with
an index (L{pfxpold.rules.program}). The check itself, which loads files,
keeps marks and answers requests, is L{pfxpold.checks.rules}.
"""
