"""
The daemon started for real answers the original README's demo request.
"""

from tests.integration.support import running_daemon


def test_demo_answers(tmp_path):
    """With no configuration, twistd -n pfxpold answers the demo's coin toss."""
    with running_daemon(tmp_path) as daemon, daemon.client() as client:
        answers = {
            client.ask(
                {"sender": "foo@example.com", "client_address": "1.2.3.4", "client_name": "foo.bar"}
            )
            for _ in range(40)
        }
    assert answers <= {"OK (you win!)", "DUNNO (you lose!)"}
    assert len(answers) == 2
    assert "demo check" in daemon.log()
