"""
Throwaway TLS certificates for integration tests: a CA and a server
certificate it signed for 127.0.0.1, made with cryptography (a dependency of
Twisted's TLS support).
"""

from __future__ import annotations

import datetime
import ipaddress
import os

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
