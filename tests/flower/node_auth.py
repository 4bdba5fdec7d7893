"""Run with the Flower integration's Python: the ServerApp's admission against a stand-in
Grid (no SuperLink). With require-node-auth, a SuperNode without a Flower node-auth public
key gets no identify query and no token; an authenticated one is identified and invited,
and the token reaches it in a query.join ConfigRecord. Prints a JSON summary."""

from __future__ import annotations

import json
from typing import Any

from atoll_flower import atoll_cli, server_app, wire
from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

TOKEN = "atoll1.lab-k.0123456789ab." + "s" * 32 + "." + "c" * 64


class StandInGrid:
    """Nodes 7 (no public key) and 8 (registered with node auth); node 8 answers at once."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.replies: list[Message] = []

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=7), NodeInfo(node_id=8, public_key=b"ssh-ed25519 AAAA")]

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
    config = {
        "coordinator-state": "/srv/atoll", "coordinator-address": "coord:7443",
        "enrol-address": "", "coordinator": "coordinator", "invite-ttl": "1h",
        "require-node-auth": True, "poll-seconds": 0.1, "reply-timeout-seconds": 5.0,
        "silent-after-seconds": 60.0, "wait-for-nodes-seconds": 5.0, "timeout-seconds": 5.0,
        "report-file": "",
    }  # fmt: skip
    grid = StandInGrid()
    bridge = server_app.Bridge(grid, server_app.RunSettings.from_run_config(config))  # type: ignore[arg-type]
    bridge.round(2)  # identify
    bridge.round(2)  # the join's reply
    sent = [(m.metadata.dst_node_id, m.metadata.message_type, wire.values(m)) for m in grid.pushed]
    print(
        json.dumps(
            {
                "states": {str(n.node_id): [n.state, n.reason] for n in bridge.nodes.values()},
                "invited": invited,
                "sent": [[node, kind, values.get("token", "")] for node, kind, values in sent],
                "array_records": bridge.array_records,
            }
        )
    )


if __name__ == "__main__":
    main()
