"""An aiosmtpd handler that stores what it receives, for tests/smtp.rs.

Run through aiosmtpd's own command line, with this directory on PYTHONPATH:

    python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_sink.Sink DIR

Each accepted message becomes DIR/NNNNNN.eml (the bytes received after DATA) and
DIR/NNNNNN.json (the envelope: mail_from, rcpt_tos), both renamed into place once
complete and before the server answers 250. Recipients whose local part starts with
"reject" are refused with 550 (permanent), "busy" with 451 (temporary).
"""

import itertools
import json
import os


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.counter = itertools.count(1)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("smtp_sink.Sink takes one argument: the directory to write to")
        os.makedirs(args[0], exist_ok=True)
        return cls(args[0])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 No such mailbox here"
        if local.startswith("busy"):
            return "451 4.3.0 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        base = os.path.join(self.directory, "%06d" % next(self.counter))
        with open(base + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump({"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos}, f)
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        os.replace(base + ".json.tmp", base + ".json")
        os.replace(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 Message accepted"
