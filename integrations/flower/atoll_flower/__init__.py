"""Atoll over Flower: SuperNodes receive Atoll invites as Flower messages and start
``site-agent join``; the experts' weights still travel over Atoll's signed, resumable upload.

Flower is the control plane a lab already runs; Atoll stays the data plane. No Flower message
carries an ``ArrayRecord``: the ServerApp sends ``query`` messages holding one ``ConfigRecord``
(coordinator address, a one-use enrolment token, the federation CA's sha256) and asks for
status; the ClientApp answers from ``site-agent status --json``.

Run it (see the README's "With Flower")::

    bash integrations/flower/install.sh ~/.venvs/atoll-flower
    ~/.venvs/atoll-flower/bin/flwr run integrations/flower my-superlink --stream \\
        --run-config 'coordinator-state="/srv/atoll" coordinator-address="coord.example.org:7443"
                      authorized-keys="/srv/atoll/flower-keys"'

Each SuperNode names its site and workdir in its node config::

    flower-supernode --superlink link.example.org:8000 \\
        --node-config 'atoll-site="uni-a" atoll-workdir="/data/atoll" atoll-site-agent="/opt/atoll/.venv/bin/site-agent"'

This package never imports Atoll: it runs the ``coordinator`` and ``site-agent`` commands.
"""
