"""Run with the Flower integration's Python: who gets a token, and who accepts one.

* The ServerApp against a stand-in Grid (no SuperLink): with require-node-auth, a SuperNode
  whose Flower node key is not in authorized-keys gets no identify query and no token; a
  listed one is identified and invited, and the token reaches it in a query.join
  ConfigRecord.
* The ClientApp's join handler: a node that pins its federation's CA (atoll-ca-sha256)
  refuses a token for another CA and starts nothing.

Usage: python node_auth.py WORKDIR. Prints a JSON summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from atoll_flower import atoll_cli, client_app, node_keys, server_app, wire
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

TOKEN = "atoll1.lab-k.0123456789ab." + "s" * 32 + "." + "c" * 64


def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A node's key as the SuperLink reports it in NodeInfo.public_key."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class StandInGrid:
    """Nodes 7 (a key nobody listed) and 8 (a listed key); node 8 answers at once."""

    def __init__(self, unlisted: bytes, listed: bytes) -> None:
        self.keys = {7: unlisted, 8: listed}
        self.pushed: list[Message] = []
        self.replies: list[Message] = []

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=key) for n, key in self.keys.items()]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink does
            self.pushed.append(message)
            answer: dict[str, Any] = {"site": "lab-k", "enrolled": False}
            if message.metadata.message_type == wire.JOIN:
                answer = {"started": True, "pid": 1}
            self.replies.append(Message(wire.content(answer), reply_to=message))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        ready = [r for r in self.replies if r.metadata.reply_to_message_id in message_ids]
        self.replies = [r for r in self.replies if r not in ready]
        return ready


def main() -> None:
    # What flwr-serverapp sets for the run it executes (messages are stamped with it).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    invited: list[str] = []
    atoll_cli.federation_status = lambda *_: {"plan": {"experts": 2}, "sites": []}
    atoll_cli.invite = lambda _c, _s, site, _t: (
        invited.append(site) or {"token": TOKEN, "ca_sha256": "c" * 64, "federation": "f"}
    )
    workdir = Path(sys.argv[1])
    workdir.parent.mkdir(parents=True, exist_ok=True)
    listed, unlisted = (
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP384R1()),
    )
    ssh_line = listed.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys_file = workdir.parent / "authorized-keys"
    keys_file.write_text("# uni-k\n" + ssh_line.decode() + " uni-k\n")
    config = {
        "coordinator-state": "/srv/atoll", "coordinator-address": "coord:7443",
        "enrol-address": "", "coordinator": "coordinator", "invite-ttl": "1h",
        "require-node-auth": True, "authorized-keys": str(keys_file), "poll-seconds": 0.1, "reply-timeout-seconds": 5.0,
        "silent-after-seconds": 60.0, "wait-for-nodes-seconds": 5.0, "timeout-seconds": 5.0,
        "report-file": "",
    }  # fmt: skip
    grid = StandInGrid(pem(unlisted), pem(listed))
    settings = server_app.RunSettings.from_run_config(config)
    bridge = server_app.Bridge(grid, settings)  # type: ignore[arg-type]
    bridge.authorized = node_keys.load(keys_file)
    bridge.round(2)  # identify
    bridge.round(2)  # the join's reply
    sent = [(m.metadata.dst_node_id, m.metadata.message_type, wire.values(m)) for m in grid.pushed]

    # The ClientApp: the invitation's CA is not the one this node pinned.
    node_config = {"atoll-workdir": str(workdir), "atoll-ca-sha256": "d" * 64}
    context = Context(1, 8, node_config, RecordDict(), {})  # type: ignore[arg-type]
    invitation = server_app.Bridge._invitation(
        bridge, TOKEN, {"ca_sha256": "c" * 64, "federation": "f"}
    )
    message = Message(wire.content(invitation), 8, wire.JOIN)
    message.metadata.__dict__["_message_id"] = message.object_id
    refused = wire.values(client_app.join(message, context))
    print(
        json.dumps(
            {
                "states": {str(n.node_id): [n.state, n.reason] for n in bridge.nodes.values()},
                "invited": invited,
                "sent": [[node, kind, values.get("token", "")] for node, kind, values in sent],
                "array_records": bridge.array_records,
                "pinned_join": refused,
                "workdir_files": sorted(p.name for p in workdir.glob("*")),
            }
        )
    )


if __name__ == "__main__":
    main()
