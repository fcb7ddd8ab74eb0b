#!/usr/bin/env bash
# The GPU suite in one command, for a lent GPU machine with this project copied over: every CUDA test, the 1b
# preset's training and decoding figures against transformers, and a 200-step training run with a resume check,
# all into bench_gpu_1b.json and bench_gpu_1b.log (and $OUT, where set), in under 8 minutes on an H100.
#
#     ./bench_gpu.sh                 # the GPU machine: installs the wheels carried in .whl/ first
#     ./bench_gpu.sh --dry-run       # here, on the CPU (in the project's .venv): the same steps, tiny shapes
#
# Budgets, in seconds on an H100 (gpu_suite.py stops each part at its own): wheels and environment 20, tests 140,
# eager bench 60, compiled bench 110, training 150: 480 in all. Other arguments go to gpu_suite.py (--parts ...).
#
# The machine has torch, transformers, tiktoken, numpy and tqdm but not python-dotenv, datasets (nor its dill and
# multiprocess) or llama-models (Meta's tokenizer.model is inside): .whl/ holds their wheels, fetched beforehand
# with `pip download --no-deps` (see the notes for the exact list), installed here without an index.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [[ " $* " != *" --dry-run "* ]] && ! "$PYTHON" -c "import dotenv, datasets, llama_models" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "bench_gpu.sh: python-dotenv, datasets or llama-models is missing and .whl/ holds no wheels to install" \
             "(carry .whl with the project)" >&2
        exit 2
    fi
    # one wheel per package: the pure-Python ones and those built for this interpreter (multiprocess is per version)
    tag=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
    shopt -s nullglob
    wheels=(.whl/*-py3-none-any.whl .whl/*-py"$tag"-none-any.whl .whl/*-cp"$tag"-*.whl)
    SITE=${BENCH_GPU_SITE:-/tmp/bench-gpu-site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        || { echo "bench_gpu.sh: installing ${wheels[*]} failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" gpu_suite.py "$@"
