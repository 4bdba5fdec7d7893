"""Where the one feature model lives: in protocol/, below the coordinator and the ensemble
that both use it, with its naming loadable without torch (the slim coordinator and
``coordinator assemble`` read encoder specs and files but never run an encoder)."""

from __future__ import annotations

import os
import subprocess
import sys

from test_imports import import_graph, module_files


def test_protocol_imports_only_protocol() -> None:
    graph = import_graph(module_files())
    above = {
        module: sorted(i for i in imported if not i.startswith("protocol"))
        for module, imported in graph.items()
        if module.startswith("protocol")
    }
    assert {m: i for m, i in above.items() if i} == {}
    # Partitioning and routing both take their features from it.
    assert "protocol.feature_model" in graph["coordinator.partition.plan_features"]
    assert "protocol.feature_model" in graph["ensemble.router"]


def test_encoder_naming_loads_without_torch() -> None:
    probe = (
        "import sys, protocol.encoder_files, coordinator.router_files; "
        "print(sorted(m for m in ('torch', 'numpy', 'open_clip') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
        check=True,
    )
    assert done.stdout.strip() == "[]"
