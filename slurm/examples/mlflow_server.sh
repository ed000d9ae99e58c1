#!/usr/bin/env bash
# MLflow tracking server for cluster runs. Start it on a persistent service/login node that
# compute nodes can reach (or ask the admins for one); jobs then export
#   MLFLOW_TRACKING_URI=http://<this-host>:5000
# Why a server: sqlite:///mlflow.db on NFS/Lustre locks up or corrupts (SQLite's file locks
# are unreliable on network file systems), and every rank/job of every user would open it.
# The server is the only writer of its backend store; artifacts go to the parallel FS.
set -euo pipefail
# Backend store: PostgreSQL for a shared/long-lived server; SQLite only on this host's
# LOCAL disk (one writer: the server).
BACKEND=${MLFLOW_BACKEND:-sqlite:////var/tmp/$USER/mlflow/mlflow.db}           # ADAPT
ARTIFACTS=${MLFLOW_ARTIFACTS:-/lustre/$USER/hpcgan/mlartifacts}                # ADAPT: shared FS
mkdir -p "/var/tmp/$USER/mlflow" "$ARTIFACTS"
# --serve-artifacts: clients upload through the server, so compute nodes need no FS
# write access to the artifact root and no cloud credentials.
exec mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
    --serve-artifacts --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" --workers 4
