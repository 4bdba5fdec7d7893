"""The ClientApp: runs at each lab's SuperNode, starts and reports on ``site-agent join``.

What differs per lab comes from the SuperNode's ``--node-config``:

* ``atoll-workdir`` (required): the site's Atoll working directory (key, certificate, shard,
  checkpoints); it never leaves the lab.
* ``atoll-site``: the site's name in the federation (default ``flower-<node id>``).
* ``atoll-site-agent``: path of Atoll's ``site-agent`` command (default ``site-agent``).
* ``atoll-image-root``, ``atoll-base-model``: passed to ``site-agent join``.
* ``atoll-ca-sha256``: pin the federation CA this lab agreed to join; a token for any other CA
  is refused.
* ``atoll-coordinator``: pin the coordinator address; the ServerApp's address is then ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, UserConfig
from flwr.clientapp import ClientApp

from atoll_flower import atoll_cli, wire

log = logging.getLogger("flwr").getChild("atoll")
app = ClientApp(mods=[wire.refuse_arrays])


@dataclass(frozen=True)
class SiteSettings:
    site: str
    workdir: Path
    site_agent: str
    image_root: str
    base_model: str
    ca_sha256: str
    coordinator: str

    @classmethod
    def from_node_config(cls, config: UserConfig, node_id: int) -> SiteSettings:
        def text(key: str, default: str = "") -> str:
            value = config.get(key, default)
            if not isinstance(value, str):
                raise ValueError(f"node config {key}={value!r}: expected a string")
            return value

        workdir = text("atoll-workdir")
        if not workdir:
            raise ValueError(
                "node config atoll-workdir is missing: start the SuperNode with "
                "--node-config 'atoll-workdir=\"/path/to/workdir\"'"
            )
        return cls(
            site=text("atoll-site", f"flower-{node_id}"),
            workdir=Path(workdir),
            site_agent=text("atoll-site-agent", "site-agent"),
            image_root=text("atoll-image-root"),
            base_model=text("atoll-base-model"),
            ca_sha256=text("atoll-ca-sha256").lower(),
            coordinator=text("atoll-coordinator"),
        )


def _reply(message: Message, values: dict[str, str | int | float | bool]) -> Message:
    return Message(wire.content(values), reply_to=message)


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Who this node is in Atoll: its site name and whether its workdir is enrolled."""
    try:
        settings = SiteSettings.from_node_config(context.node_config, context.node_id)
        status = atoll_cli.site_status(settings.site_agent, settings.workdir)
    except (ValueError, atoll_cli.AtollCommandError) as error:
        return _reply(message, {"error": str(error)})
    return _reply(
        message,
        {
            "site": status["site"] if status else settings.site,
            "enrolled": status is not None,
            "running": atoll_cli.join_running(settings.workdir) is not None,
            "phase": status["phase"] if status else "not enrolled",
        },
    )


@app.query("join")
def join(message: Message, context: Context) -> Message:
    """Starts ``site-agent join`` detached (unless it already runs); training then outlives
    this message, its TTL and this process."""
    try:
        settings = SiteSettings.from_node_config(context.node_config, context.node_id)
        invitation = wire.values(message)
        token = str(invitation.get("token", ""))
        if token:
            pin = token.rsplit(".", 1)[-1]
            if pin != invitation.get("ca_sha256"):
                raise ValueError("the token's CA pin differs from the invitation's ca_sha256")
            if settings.ca_sha256 and pin != settings.ca_sha256:
                raise ValueError(
                    f"invited to a federation whose CA has sha256 {pin[:16]}.., but this node "
                    f"pins atoll-ca-sha256={settings.ca_sha256[:16]}..: refused"
                )
        running = atoll_cli.join_running(settings.workdir)
        if running is not None:
            return _reply(message, {"started": False, "pid": running})
        pid = atoll_cli.start_join(
            settings.site_agent,
            settings.workdir,
            settings.coordinator or str(invitation["coordinator"]),
            token,
            enrol_address="" if settings.coordinator else str(invitation.get("enrol_address", "")),
            image_root=settings.image_root,
            base_model=settings.base_model,
        )
    except (ValueError, KeyError, OSError) as error:
        return _reply(message, {"started": False, "error": str(error)})
    log.info("[atoll] started site-agent join for %s (pid %d)", settings.site, pid)
    return _reply(message, {"started": True, "pid": pid})


@app.query("status")
def status(message: Message, context: Context) -> Message:
    """The site's state from ``site-agent status --json``."""
    try:
        settings = SiteSettings.from_node_config(context.node_config, context.node_id)
        report = atoll_cli.site_status(settings.site_agent, settings.workdir)
    except (ValueError, atoll_cli.AtollCommandError) as error:
        return _reply(message, {"error": str(error)})
    running = atoll_cli.join_running(settings.workdir) is not None
    if report is None:
        return _reply(
            message,
            {"site": settings.site, "phase": "enrolling" if running else "not enrolled",
             "running": running},
        )  # fmt: skip
    accepted = report.get("accepted") or {}
    expert = report.get("expert_index")
    return _reply(
        message,
        {
            "site": report["site"],
            "phase": report["phase"],
            "expert": -1 if expert is None else int(expert),
            "step": int(report.get("step") or 0),
            "total_steps": int(report.get("total_steps") or 0),
            "accepted_digest": str(accepted.get("model_root_digest") or ""),
            "running": running,
            "message": str(report.get("message", ""))[:300],
        },
    )
