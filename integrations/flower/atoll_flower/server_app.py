"""The ServerApp: one Atoll invite per connected SuperNode, then progress until every expert
is accepted.

It runs where the coordinator's state directory is (it runs ``coordinator invite``). Steps:

1. wait until one SuperNode per expert is connected (``coordinator status --json`` names K);
2. ``query.identify`` each node: its site name (node config ``atoll-site``) and whether its
   workdir is already enrolled;
3. mint a one-use token for each new site (``coordinator invite --json``) and send it in a
   ``query.join`` ConfigRecord; an enrolled node gets no token and resumes;
4. every ``poll-seconds``: ``query.status`` to every node, cross-checked against the
   coordinator (``status --json``: progress and accepted experts); a node
   that stops answering is reported silent (its ``site-agent`` runs on without it);
5. done when the coordinator has accepted every expert; the report lists each expert, its
   site, and each node (``report-file`` also gets it as JSON).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, UserConfig
from flwr.serverapp import Grid, ServerApp

from atoll_flower import atoll_cli, node_keys, wire

# A child of flwr's logger: its lines reach `flwr run --stream` and `flwr log`.
log = logging.getLogger("flwr").getChild("atoll")
app = ServerApp()


@dataclass(frozen=True)
class RunSettings:
    """The run config (``[tool.flwr.app.config]``), validated once."""

    coordinator_state: str
    coordinator_address: str
    enrol_address: str
    coordinator: str
    invite_ttl: str
    require_node_auth: bool
    authorized_keys: str
    poll_seconds: float
    reply_timeout_seconds: float
    silent_after_seconds: float
    wait_for_nodes_seconds: float
    timeout_seconds: float
    report_file: str

    @classmethod
    def from_run_config(cls, config: UserConfig) -> RunSettings:
        values: dict[str, Any] = {}
        for name, kind in cls.__annotations__.items():
            key = name.replace("_", "-")
            value = config.get(key)
            expected = {"str": str, "bool": bool, "float": (int, float)}[kind]
            if (
                value is None
                or not isinstance(value, expected)
                or (kind == "float" and isinstance(value, bool))
            ):
                raise ValueError(f"run config {key}={value!r}: expected a {kind}")
            values[name] = float(value) if kind == "float" else value
        settings = cls(**values)
        if settings.require_node_auth and not settings.authorized_keys:
            raise ValueError(
                "run config require-node-auth=true needs authorized-keys: a file of the "
                "SuperNodes' public keys (as given to `flwr supernode register`)"
            )
        for key in ("coordinator_state", "coordinator_address"):
            if not getattr(settings, key):
                raise ValueError(
                    f"run config {key.replace('_', '-')} is empty: pass it with "
                    f"--run-config '{key.replace('_', '-')}=\"...\"'"
                )
        return settings


ACTIVE = ("invited", "joined", "silent")  # nodes that hold a token or an enrolled workdir


@dataclass
class Node:
    """What the ServerApp knows about one SuperNode."""

    node_id: int
    site: str = ""
    # connected -> invited (a join sent) -> joined (it answered) -> silent; or refused
    state: str = "connected"
    reason: str = ""
    last_reply: float = 0.0
    invited_at: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bridge:
    """The ServerApp's state: every node, the queries still awaiting a reply, counters.

    Queries are pushed and their replies pulled as they come: a slow ClientApp's late reply
    still counts (until the query's TTL), and nothing waits on one silent node.
    """

    grid: Grid
    settings: RunSettings
    nodes: dict[int, Node] = field(default_factory=dict)
    authorized: set[bytes] = field(default_factory=set)
    pending: dict[str, tuple[int, str, float]] = field(default_factory=dict)
    sent: int = 0
    received: int = 0
    array_records: int = 0

    # -- messages ------------------------------------------------------------------------

    def send(self, message_type: str, payloads: dict[int, dict[str, Any]]) -> None:
        """Pushes one query per node; its reply is picked up by ``collect``."""
        if not payloads:
            return
        ttl = self.settings.reply_timeout_seconds
        messages = [
            Message(wire.content(body), node_id, message_type, ttl=ttl)
            for node_id, body in payloads.items()
        ]
        self.array_records += sum(wire.array_records(m) for m in messages)
        ids = list(self.grid.push_messages(messages))
        self.sent += len(messages)
        for message_id, node_id in zip(ids, payloads, strict=True):
            if message_id:
                self.pending[message_id] = (node_id, message_type, time.time() + ttl)

    def awaiting(self, node_id: int, message_type: str) -> bool:
        return any(p[:2] == (node_id, message_type) for p in self.pending.values())

    def collect(self, wait: float) -> list[tuple[int, str, dict[str, object] | None, str]]:
        """Replies that arrive within ``wait`` seconds (sooner when none is pending):
        ``(node, message type, values or None, error)``. Replies are matched by the query
        they answer: an error reply for an unreachable node comes from the SuperLink."""
        deadline = time.monotonic() + wait
        events: list[tuple[int, str, dict[str, object] | None, str]] = []
        while self.pending:
            for reply in self.grid.pull_messages(list(self.pending)):
                asked = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if asked is None:
                    continue
                self.received += 1
                self.array_records += wire.array_records(reply)
                if reply.has_error():
                    events.append((asked[0], asked[1], None, reply.error.reason))
                else:
                    events.append((asked[0], asked[1], wire.values(reply), ""))
            for message_id, (node_id, kind, expires) in list(self.pending.items()):
                if time.time() > expires:
                    del self.pending[message_id]
                    events.append((node_id, kind, None, "no reply within the query's TTL"))
            if time.monotonic() >= deadline or not self.pending:
                break
            time.sleep(0.5)
        return events

    # -- one round -----------------------------------------------------------------------

    def round(self, experts: int) -> None:
        """Identifies new nodes, asks joined ones for status, handles what came back."""
        identify: dict[int, dict[str, Any]] = {}
        for info in self.grid.get_nodes():
            node = self.nodes.setdefault(info.node_id, Node(info.node_id))
            if node.state != "connected" or self.awaiting(node.node_id, wire.IDENTIFY):
                continue
            if self.settings.require_node_auth and not node_keys.is_listed(
                info.public_key, self.authorized
            ):
                node.state, node.reason = "refused", "its Flower node key is not in authorized-keys"
                log.warning("[atoll] node %d gets no token: %s", node.node_id, node.reason)
                continue
            identify[node.node_id] = {}
        self.send(wire.IDENTIFY, identify)
        self.send(
            wire.STATUS,
            {
                n.node_id: {}
                for n in self.nodes.values()
                if n.state in ACTIVE and not self.awaiting(n.node_id, wire.STATUS)
            },
        )
        joins: dict[int, dict[str, Any]] = {}
        for node_id, kind, answer, error in self.collect(self.settings.poll_seconds):
            node = self.nodes[node_id]
            if answer is None:
                if node.state in ("invited", "joined"):
                    node.reason = error
                    self._silent(node)
                continue
            node.last_reply = time.time()
            if kind == wire.IDENTIFY and node.state == "connected":
                self._admit(node, answer, joins, experts)
            elif kind == wire.JOIN:
                if answer.get("error"):
                    node.state, node.reason = "refused", str(answer["error"])
                    log.warning("[atoll] node %d (%s) did not join: %s", node_id, node.site,
                                node.reason)  # fmt: skip
                else:
                    node.state = "joined"
                    log.info("[atoll] node %d joins as site %s (site-agent pid %s)",
                             node_id, node.site, answer.get("pid"))  # fmt: skip
            elif kind == wire.STATUS:
                if answer.get("error"):
                    log.warning("[atoll] node %d (%s): %s", node_id, node.site, answer["error"])
                if node.state == "silent":
                    log.info("[atoll] node %d (%s) answers again", node_id, node.site)
                node.status, node.state = dict(answer), "joined"
        self.send(wire.JOIN, joins)
        now = time.time()
        for node in self.nodes.values():
            quiet = now - max(node.last_reply, node.invited_at)
            if node.state in ("invited", "joined") and quiet > self.settings.silent_after_seconds:
                node.reason = f"no reply for {quiet:.0f}s"
                self._silent(node)

    def _admit(
        self, node: Node, answer: dict[str, object], joins: dict[int, dict[str, Any]], experts: int
    ) -> None:
        """Decides on an identified node: resume, invite (a fresh token) or refuse."""
        node.site = str(answer.get("site", ""))
        taken = {n.site for n in self.nodes.values() if n.state in ACTIVE}
        if answer.get("error") or not node.site:
            node.state, node.reason = "refused", str(answer.get("error", "no site name"))
        elif node.site in taken:
            node.state, node.reason = "refused", f"site {node.site!r} is another node's"
        elif answer.get("enrolled"):
            joins[node.node_id] = self._invitation("")  # resumes; no token needed
        elif node.site in {row["site"] for row in self._status()["sites"]}:
            node.state = "refused"
            node.reason = f"site {node.site!r} is enrolled already, from another workdir"
        elif len(taken) >= experts:
            node.state, node.reason = "refused", f"all {experts} experts have a site"
        else:
            invited = atoll_cli.invite(
                self.settings.coordinator, self.settings.coordinator_state, node.site,
                self.settings.invite_ttl,
            )  # fmt: skip
            joins[node.node_id] = self._invitation(invited["token"], invited)
        if node.state == "refused":
            log.warning("[atoll] node %d refused: %s", node.node_id, node.reason)
        else:
            # The token may arrive even if the reply does not: poll the node from now on.
            node.state, node.invited_at = "invited", time.time()

    def _invitation(self, token: str, invited: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "coordinator": self.settings.coordinator_address,
            "enrol_address": self.settings.enrol_address,
            "token": token,
            "ca_sha256": invited["ca_sha256"] if invited else "",
            "federation": invited["federation"] if invited else "",
        }

    def _silent(self, node: Node) -> None:
        if node.state == "silent":
            return
        node.state = "silent"
        row = next((r for r in self._status()["sites"] if r["site"] == node.site), {})
        log.warning(
            "[atoll] SuperNode %d (site %s) is silent (%s); the coordinator last heard from "
            "its site-agent %s s ago (phase %s): the site-agent goes on without Flower",
            node.node_id, node.site, node.reason, _seconds(row.get("seconds_since_heartbeat")),
            row.get("phase", "?"),
        )  # fmt: skip

    # -- the coordinator's view ----------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        return atoll_cli.federation_status(
            self.settings.coordinator, self.settings.coordinator_state
        )

    def accepted(self) -> dict[int, dict[str, Any]]:
        """Accepted experts (``coordinator status --json``), each checked against what its
        site reports; logs each site's progress."""
        status = self._status()
        accepted = atoll_cli.accepted_experts(status)
        by_site = {row["site"]: row for row in accepted.values()}
        rows = {row["site"]: row for row in status["sites"]}
        for node in self.nodes.values():
            digest = str(node.status.get("accepted_digest", ""))
            coordinator_digest = by_site.get(node.site, {}).get("accepted_model_digest", "")
            if digest and coordinator_digest and digest != coordinator_digest:
                raise RuntimeError(
                    f"site {node.site} reports accepted model {digest[:16]}.., the coordinator "
                    f"accepted {coordinator_digest[:16]}.."
                )
            row = rows.get(node.site)
            if row is not None and node.state in ACTIVE:
                log.info("[atoll] %s: expert %s, %s %s/%s", node.site, row["expert"],
                         row["phase"], row["step"], row["total_steps"])  # fmt: skip
        return accepted

    def settle(self, attempts: int = 2) -> None:
        """Last status rounds: a node that answers none of them is reported silent. A second
        round gives a node whose ClientApp failed once (Flower restarts tasks) another chance."""
        active = [n.node_id for n in self.nodes.values() if n.state in ACTIVE]
        answered: set[int] = set()
        for _ in range(attempts):
            asking = [n for n in active if n not in answered and not self.awaiting(n, wire.STATUS)]
            self.send(wire.STATUS, {n: {} for n in asking})
            for node_id, kind, answer, error in self.collect(self.settings.reply_timeout_seconds):
                node = self.nodes[node_id]
                if kind == wire.STATUS and answer is not None:
                    node.status, node.state, node.reason = dict(answer), "joined", ""
                    answered.add(node_id)
                elif answer is None and node_id not in answered:
                    node.reason = error
            if answered >= set(active):
                break
        for node_id in active:
            if node_id not in answered:
                node = self.nodes[node_id]
                node.reason = node.reason or "no reply to the final status query"
                self._silent(node)

    def report(self, experts: int, accepted: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {
            "experts": experts,
            "complete": len(accepted) == experts,
            "accepted": {
                str(k): {
                    "site": row["site"],
                    "model_root_digest": row["accepted_model_digest"],
                    "log_index": row["accepted_log_index"],
                }
                for k, row in sorted(accepted.items())
            },
            "nodes": {str(n.node_id): asdict(n) for n in self.nodes.values()},
            "messages": {
                "sent": self.sent,
                "received": self.received,
                "array_records": self.array_records,
            },
        }


def _seconds(value: object) -> str:
    return "?" if not isinstance(value, (int, float)) else f"{value:.0f}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    bridge = Bridge(grid, settings)
    if settings.require_node_auth:
        bridge.authorized = node_keys.load(Path(settings.authorized_keys))
    plan = bridge._status()["plan"]
    if plan is None:
        raise RuntimeError(
            f"{settings.coordinator_state} has no partition plan yet: run `coordinator partition`"
        )
    experts = int(plan["experts"])
    start = time.monotonic()
    while sum(1 for _ in grid.get_node_ids()) < experts:
        if time.monotonic() - start > settings.wait_for_nodes_seconds:
            raise RuntimeError(
                f"fewer than {experts} SuperNodes connected after "
                f"{settings.wait_for_nodes_seconds:.0f}s (wait-for-nodes-seconds)"
            )
        time.sleep(1.0)
    log.info("[atoll] %d experts; inviting the connected SuperNodes", experts)
    accepted: dict[int, dict[str, Any]] = {}
    while True:
        began = time.monotonic()
        bridge.round(experts)
        accepted = bridge.accepted()
        if len(accepted) == experts or time.monotonic() - start > settings.timeout_seconds:
            break
        # Each status query starts a ClientApp process at the node: not more than one a period.
        time.sleep(max(0.0, settings.poll_seconds - (time.monotonic() - began)))
    bridge.settle()
    report = bridge.report(experts, accepted)
    if settings.report_file:
        Path(settings.report_file).write_text(json.dumps(report, indent=2))
    for index, row in report["accepted"].items():
        log.info("[atoll] expert %s accepted from %s (log index %s)", index, row["site"],
                 row["log_index"])  # fmt: skip
    for node in bridge.nodes.values():
        if node.state != "joined":
            log.warning("[atoll] node %d (%s): %s %s", node.node_id, node.site or "-",
                        node.state, node.reason)  # fmt: skip
    if not report["complete"]:
        missing = sorted(set(range(experts)) - set(accepted))
        raise RuntimeError(f"timed out with experts {missing} not accepted (timeout-seconds)")
