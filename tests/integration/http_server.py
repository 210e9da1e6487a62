"""
A twisted.web server for the http check's integration tests, run as its
own process: C{python http_server.py PORT [CERT_AND_KEY.pem]} (HTTPS with
the second argument). Prints C{READY} once it listens.

Paths: C{/json} (the action from the posted JSON: REJECT a sender that
starts with "bad", else DUNNO), C{/form} (plain text answer from a posted
form), C{/soap} (a SOAP answer built from the posted envelope),
C{/soapfault}, C{/slow} (answers after 3 s), C{/error} (500),
C{/badjson}, C{/notxml}, C{/huge} (1 MB), C{/inject} and
C{/textinject} (an action with a line break), C{/missing} (no action
field).
"""

import json
import sys
import xml.etree.ElementTree as ElementTree
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from twisted.internet import reactor, ssl
from twisted.web import resource, server

SOAP = (
    '<?xml version="1.0"?>'
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"'
    ' xmlns:p="urn:policy"><soap:Body><p:CheckResponse><p:action>{action}</p:action>'
    "</p:CheckResponse></soap:Body></soap:Envelope>"
)
FAULT = (
    '<?xml version="1.0"?>'
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
    "<soap:Fault><faultcode>soap:Server</faultcode><faultstring>database down</faultstring>"
    "</soap:Fault></soap:Body></soap:Envelope>"
)


class Policy(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        path = request.path.decode()
        body = request.content.read()
        if path == "/json":
            attributes = json.loads(body)
            sender = attributes.get("sender", "")
            action = f"REJECT bad sender {sender}" if sender.startswith("bad") else "DUNNO"
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"result": {"action": action}, "posted": len(attributes)}).encode()
        if path == "/form":
            form = parse_qs(body.decode())
            return f"OK form from {form['client_address'][0]}\n".encode()
        if path == "/soap":
            root = ElementTree.fromstring(body)
            sender = root.find(".//{urn:policy}sender").text or ""
            return SOAP.format(action=escape(f"OK sender={sender}")).encode()
        if path == "/soapfault":
            request.setResponseCode(500)
            return FAULT.encode()
        if path == "/slow":

            def finish():
                if not request._disconnected:
                    request.write(json.dumps({"action": "OK slow"}).encode())
                    request.finish()

            reactor.callLater(3, finish)
            return server.NOT_DONE_YET
        if path == "/error":
            request.setResponseCode(500)
            return b"internal error"
        if path == "/badjson":
            return b'{"action": "OK"'
        if path == "/notxml":
            return b"hello, world"
        if path == "/huge":
            return json.dumps({"action": "OK", "pad": "x" * 1_000_000}).encode()
        if path == "/inject":
            return json.dumps({"action": "OK\naction=REJECT injected"}).encode()
        if path == "/textinject":
            return b"OK\r\naction=REJECT injected"
        if path == "/missing":
            return b'{"verdict": "OK"}'
        request.setResponseCode(404)
        return b"no such path"


def main(port, certificate=None):
    site = server.Site(Policy())
    site.noisy = False
    if certificate is None:
        reactor.listenTCP(port, site, interface="127.0.0.1")
    else:
        with open(certificate, "rb") as f:
            options = ssl.PrivateCertificate.loadPEM(f.read()).options()
        reactor.listenSSL(port, site, options, interface="127.0.0.1")
    print("READY", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:])
