"""
Throwaway TLS certificates for integration tests: a CA and a server
certificate it signed for 127.0.0.1, made with cryptography (a dependency of
Twisted's TLS support).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificates(directory) -> tuple[str, str]:
    """
    A throwaway CA and a certificate it signed for 127.0.0.1.

    @return: the CA's PEM file and the server's certificate-and-key file.
    """
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def certificate(subject, issuer, public_key, signing_key, ca, extensions=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("pfxpold test CA", "pfxpold test CA", ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf = certificate("127.0.0.1", "pfxpold test CA", key.public_key(), ca_key, False, [san])
    ca_path = os.path.join(directory, "ca.pem")
    server_path = os.path.join(directory, "server.pem")
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(server_path, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    return ca_path, server_path


def split_certificate(server_path: str, directory: str) -> tuple[str, str]:
    """
    Split the server's certificate-and-key file into two files, for
    servers (slapd) that want them apart.

    @return: the certificate's path and the key's path.
    """
    with open(server_path) as f:
        text = f.read()
    marker = text.index("-----BEGIN EC PRIVATE KEY-----")
    paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    for path, part in zip(paths, (text[:marker], text[marker:]), strict=True):
        with open(path, "w") as f:
            f.write(part)
    return paths


def make_client_certificates(directory) -> tuple[str, str, str, str]:
    """
    A throwaway CA, a server certificate it signed for 127.0.0.1 and a
    client certificate it signed for C{CN=pfxpold-client}, for servers
    that take a client's identity from its certificate (SASL EXTERNAL).

    @return: the CA's PEM file, the server's certificate-and-key file, and
        the client's certificate file and key file (apart).
    """
    ca_path = os.path.join(directory, "ca.pem")
    server_path = os.path.join(directory, "server.pem")
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def sign(subject, public_key, ca, extensions=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfxpold test CA")]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    ca = sign("pfxpold test CA", ca_key.public_key(), True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = sign("127.0.0.1", server_key.public_key(), False, [san])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = sign("pfxpold-client", client_key.public_key(), False)
    client_path = os.path.join(directory, "client.pem")
    client_key_path = os.path.join(directory, "client.key")
    for path, data in (
        (ca_path, ca.public_bytes(serialization.Encoding.PEM)),
        (server_path, server.public_bytes(serialization.Encoding.PEM) + key_pem(server_key)),
        (client_path, client.public_bytes(serialization.Encoding.PEM)),
        (client_key_path, key_pem(client_key)),
    ):
        with open(path, "wb") as f:
            f.write(data)
    return ca_path, server_path, client_path, client_key_path


@dataclass(frozen=True)
class TLSFiles:
    """
    The files of L{make_tls_files}: a CA, a server's certificate and key
    (apart, as most servers want them), and a client's certificate and key,
    apart and together (C{client_pem}: the certificate followed by its key,
    as pfxpold's C{tls_certificate} wants it).
    """

    ca: str
    server_certificate: str
    server_key: str
    client_certificate: str
    client_key: str
    client_pem: str


def make_tls_files(directory, server_name: str = "127.0.0.1") -> TLSFiles:
    """
    A throwaway CA that signed a server certificate naming only
    C{server_name} (an IP address or a DNS name) and a client certificate
    for C{CN=pfxpold-client}: for servers that check clients' certificates
    and talk TLS to each other (replication, a cluster's bus), and, with a
    DNS name, for clients that must verify a name the address does not
    carry.
    """
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfxpold test CA")])
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def issue(subject: str, public_key, ca: bool, names=None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    try:
        server_names = [x509.IPAddress(ipaddress.ip_address(server_name))]
    except ValueError:
        server_names = [x509.DNSName(server_name)]
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    parts = {
        "ca.pem": issue("pfxpold test CA", ca_key.public_key(), True).public_bytes(pem),
        "server-cert.pem": issue(
            server_name, server_key.public_key(), False, server_names
        ).public_bytes(pem),
        "server-key.pem": server_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
        "client-cert.pem": issue("pfxpold-client", client_key.public_key(), False).public_bytes(
            pem
        ),
        "client-key.pem": client_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    }
    parts["client.pem"] = parts["client-cert.pem"] + parts["client-key.pem"]
    paths = {}
    for name, data in parts.items():
        paths[name] = os.path.join(directory, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return TLSFiles(
        paths["ca.pem"],
        paths["server-cert.pem"],
        paths["server-key.pem"],
        paths["client-cert.pem"],
        paths["client-key.pem"],
        paths["client.pem"],
    )
