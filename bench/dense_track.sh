#!/usr/bin/env bash
# Dense transfer (bench/dense.py): first the probes' learning rates on the validation scenes (probe-training scenes
# of train[:50000], evaluation scenes of train[50000:]; the test scenes stay unread) with BYOL, seed 0; then the
# sweep on the test scenes, every encoder, seeds 0-2. Resumable: recorded probes are skipped, kept encoders reused,
# so `nohup bench/dense_track.sh > dense.log 2>&1 &` can be started again in a later session.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
validate() { "$PY" bench/dense.py --validation --encoders byol --seeds 0 "$@"; }
validate --linear_learning_rate 1e-3 --upernet_learning_rate 3e-4
validate --linear_learning_rate 1e-2 --no-upernet
validate --linear_learning_rate 3e-2 --no-upernet
validate --linear_learning_rate 1e-2 --upernet_learning_rate 1e-3
# The sweep on the test scenes, with the learning rates the grid chose (bench/dense.py's defaults: linear 3e-2,
# UperNet 1e-3; docs/benchmarks.md, "Dense transfer"); seed-major, so every encoder gets seed 0 first. After seed 0
# the paired BYOL / Ladder-BYOL seeds come first (the claim that needs the pairs), then the random-init floor, the
# supervised ceiling (its training is not checkpointed: start it with 45 minutes to spare), and the small-track
# MoCo (the designs sweep's baseline) as a reference.
sweep() { "$PY" bench/dense.py "$@"; }
sweep --encoders random_init,supervised,byol,ladder_byol --seeds 0
sweep --encoders byol,ladder_byol --seeds 1,2
sweep --encoders random_init --seeds 1,2
sweep --encoders supervised --seeds 1,2
sweep --encoders moco_baseline --seeds 0,1,2
