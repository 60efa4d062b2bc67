#!/usr/bin/env bash
# The whole GPU check in one command, at most 10 minutes: GPU tests, kernel and CUDA-graph benchmarks,
# issue 11's sharded-sampling row and the E-CAR vs DiT-XL/2 throughput sweep, every result under OUTDIR.
# The FLOPs table is not part of it: its counts run on the meta device and do not depend on the
# machine, so `python -m benchmarks.flops` on any CPU gives them without spending device time.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Needs a CUDA machine with torch and triton installed; nothing is downloaded. The repo is installed
# with `pip install --no-deps -e .` (where pip cannot write, it is imported in place instead). Python
# packages missing there (diffusers and importlib_metadata on the project's GPU image) are installed
# from wheels in $ECAR_WHEELS (default .whl/, which git ignores), into $ECAR_SITE where pip cannot write.
# Fetch them once on a machine with network access (add pytest-benchmark py-cpuinfo where those are
# missing too):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#
# Each part runs under `timeout` with its own budget (seconds below), cut to what is left of T_TOTAL so
# that the whole suite ends in time for the caller to pack OUTDIR; a part that fails or runs out of time
# is logged in OUTDIR/parts.txt and the suite goes on. The throughput harness rewrites its JSON and
# Markdown after every row, so a part cut short still leaves what it measured. With ECAR_PACK=FILE.tgz
# OUTDIR is packed into FILE.tgz after every part (atomically), so that a call cut off by the device
# tool's own limit still brings back everything up to the last finished part, and what the part under way
# had written 30 s before. Before and after each part
# the GPU's clocks, power, temperature, throttle reasons and compute processes go to OUTDIR/gpu-state.log
# (the card as it was found: nothing here changes its settings).
#
# ECAR_SUITE_REHEARSAL=1 rehearses the suite on a machine without a GPU (tests/test_gpu_suite.py, in CI):
# every part runs its GPU command with CPU options appended (argparse keeps an option's last value), on
# tiny models and DiT-XL/2 at one step, so that an option the GPU run passes and a script no longer takes
# fails here and not in a GPU session's few minutes. The install step is skipped (the caller's
# environment is used as it is).
set -u
OUTDIR=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
WHEELS=${ECAR_WHEELS:-.whl}
SITE=${ECAR_SITE:-/tmp/ecar_site}
# the device has no network: pip's check for a newer pip would only wait for a timeout
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# budgets in seconds (each can be overridden from the environment); T_TOTAL bounds the whole suite, each
# part's 10 s grace after its limit included, leaving the device tool's 600 s per call time to pack OUTDIR
T_TESTS=${T_TESTS:-100} T_KERNELS=${T_KERNELS:-65} T_GRAPHS=${T_GRAPHS:-90}
T_SHARDED=${T_SHARDED:-40} T_THROUGHPUT=${T_THROUGHPUT:-230} T_TOTAL=${T_TOTAL:-565}
PACK_EVERY=${ECAR_PACK_EVERY:-30}   # seconds between the packs of OUTDIR while a part runs (with ECAR_PACK)

REHEARSAL=${ECAR_SUITE_REHEARSAL:-}
GRAPHS_CPU=() THROUGHPUT_CPU=() SHARDED_CPU=()
if [ -n "$REHEARSAL" ]; then
    GRAPHS_CPU=(--device cpu --presets ecar-tiny-vae --batches 1 --repeats 1)
    THROUGHPUT_CPU=(--device cpu --models ecar-tiny-vae ecar-digits32-attn-sc@2 --batches 1 --variant-batches 1
                    --repeats 1 --dit-steps 1 --max-call-s 5)
    SHARDED_CPU=(--per-class 8)
fi

log() { echo "[gpu_suite $(date +%T)] $*" | tee -a "$OUTDIR/suite.log"; }

gpu_state() {  # gpu_state LABEL: the card's state now, appended to OUTDIR/gpu-state.log (nothing without nvidia-smi)
    command -v nvidia-smi >/dev/null || return 0
    {
        echo "==== $1 ($(date +%T))"
        timeout 20 nvidia-smi -q -d PERFORMANCE,CLOCK,POWER,TEMPERATURE
        timeout 20 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    } >>"$OUTDIR/gpu-state.log" 2>&1
}

pack() {  # OUTDIR into $ECAR_PACK, replaced atomically, where the caller asked for it
    [ -n "${ECAR_PACK:-}" ] || return 0
    tar -czf "$ECAR_PACK.partial" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" && mv -f "$ECAR_PACK.partial" "$ECAR_PACK"
}

pack_periodically() {  # in the background while a part runs: OUTDIR packed every $PACK_EVERY s, so that a call the
    # device tool cuts off in the middle of a part (the throughput sweep) still brings back the rows written so
    # far; stopped with TERM, which waits for a pack under way (its temporary file is then packed over and
    # moved). The sleep holds none of the suite's output open, which the device tool would wait for.
    # (the trap stops every background job of the packer: a sleep started just before TERM, too)
    trap 'kill $(jobs -p) 2>/dev/null; exit 0' TERM
    while :; do
        sleep "$PACK_EVERY" </dev/null >/dev/null 2>&1 &
        wait $!
        pack
    done
}

part() {  # part NAME SECONDS COMMAND...: run under a time limit, output to OUTDIR/NAME.log
    # left: what remains of T_TOTAL less the part's 10 s grace and 2 s for what follows it (the card's state,
    # the packing) and for SECONDS counting whole seconds
    local name=$1 limit=$2 started=$SECONDS rc left=$((T_TOTAL - SECONDS - 12))
    shift 2
    if [ "$left" -lt 5 ]; then
        log "$name: skipped, the suite's ${T_TOTAL}s are spent"
        echo "$name exit=skipped seconds=0" >>"$OUTDIR/parts.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name: start (limit ${limit}s): $*"
    gpu_state "before $name"
    pack_periodically &
    local packer=$!
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    kill "$packer" && wait "$packer"
    gpu_state "after $name"
    log "$name: exit $rc after $((SECONDS - started))s"
    echo "$name exit=$rc seconds=$((SECONDS - started))" >>"$OUTDIR/parts.txt"
    pack
}

sharded() {  # issue 11's 1,008-image npz, by one process and by torchrun with a rank per GPU: the files must match
    local ranks dir
    ranks=$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
    dir=$SHARDED_DIR
    local request=(--ckpt ecar-emoji32 --class all --per-class 112 --no-progress "$@")
    echo "== one process"
    time "$PY" -m ecar_infer.cli "${request[@]}" --npz "$dir/one.npz" || return 1
    echo "== torchrun, $ranks rank(s)"
    time "$PY" -m torch.distributed.run --standalone --nproc-per-node "$ranks" -m ecar_infer.cli "${request[@]}" \
        --npz "$dir/ranks.npz" || return 1
    cmp "$dir/one.npz" "$dir/ranks.npz" && echo "the two npz files are byte-identical" && rm -r "$dir"
}

install() {  # from wheels whatever of diffusers / pytest-benchmark is missing, then the repo
    local missing
    missing=$("$PY" -c 'import importlib.util as u; print(*[m for m in ("diffusers", "pytest_benchmark") if u.find_spec(m) is None])')
    if [ -n "$missing" ]; then
        if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
            echo "missing: $missing, and no wheels in $WHEELS (see the header of benchmarks/gpu_suite.sh)"
        elif ! timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl; then
            echo "pip could not install into $PY's environment; installing the wheels into $SITE instead"
            # a failure here still installs the repo below: only the parts that need these wheels fail
            timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
                || echo "the wheels did not install either: the parts that need $missing will fail"
        fi
    fi
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . && return 0
    # Without the editable install, import the repo in place: link the two folders that setup.py maps
    # into the package (this is the device's copy of the tree).
    echo "pip could not install the repo; importing it in place"
    ln -sfn ../kernels ecar_infer/kernels && ln -sfn ../weights ecar_infer/weights
    export PYTHONPATH="$PWD:$PYTHONPATH"
}

: >"$OUTDIR/parts.txt"
log "repo $(git rev-parse --short HEAD 2>/dev/null || echo unknown), outdir $OUTDIR"
timeout 30 nvidia-smi -q >"$OUTDIR/nvidia-smi-q.txt" 2>&1
{
    grep -E "Product Name|Product Brand|Product Architecture|Form Factor|Part Number|Driver Version|CUDA Version|Power Limit|PCIe Generation|Link Width" "$OUTDIR/nvidia-smi-q.txt"
    echo "SXM or PCIe: 'H100 80GB HBM3' is the SXM part (about 700 W limit), 'H100 PCIe' / 'H100 NVL' are not (350-400 W)"
} >"$OUTDIR/nvidia-smi-excerpt.txt"
cat "$OUTDIR/nvidia-smi-excerpt.txt"

if [ -n "$REHEARSAL" ]; then
    log "rehearsal on the CPU: install skipped"
else
    install >"$OUTDIR/install.log" 2>&1
    log "install: exit $? (log in install.log)"
fi
"$PY" -c 'import platform, torch, triton, diffusers; print("python", platform.python_version(), "torch", torch.__version__,
"triton", triton.__version__, "diffusers", diffusers.__version__,
"gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' \
    >"$OUTDIR/versions.txt" 2>&1 \
    || log "WARNING: $(tail -1 "$OUTDIR/versions.txt") (the graphs and throughput parts need diffusers, for the SD-VAE decoder and DiT-XL/2: fetch its wheels as this script's header says)"

# The GPU tests in 8 processes where pytest-xdist is there (the GPU image has it): on a fresh machine most
# of their time is Triton compiling every kernel variant (the attention kernel alone: up to 3 query
# blockings x 21 dtype / head-dim / masking variants; about 0.8 s each for sm_90 on the 2-core CPU of CI),
# which is CPU work, and the machine has 16 cores.
WORKERS=$("$PY" -c 'import importlib.util as u; print("-n 8" if u.find_spec("xdist") else "")')
part gpu-tests "$T_TESTS" "$PY" -m pytest -m gpu tests/ -q -rs $WORKERS --junitxml="$OUTDIR/gpu-tests.xml"

part kernels "$T_KERNELS" "$PY" -m pytest benchmarks/bench_kernels.py --benchmark-only -q \
    --benchmark-json "$OUTDIR/kernels.json"

# the rows issue 6's targets name (ecar-xl at batch 1 and 64); the throughput part sweeps the rest
part graphs "$T_GRAPHS" "$PY" -m benchmarks.bench_graphs --out "$OUTDIR/graphs" --presets ecar-xl --batches 1 64 \
    ${GRAPHS_CPU[@]+"${GRAPHS_CPU[@]}"}

# issue 11: the GPU row of docs/BENCHMARKS.md, "Sharded FID-scale sampling"
SHARDED_DIR=$(mktemp -d)
export -f sharded && export PY SHARDED_DIR
part sharded "$T_SHARDED" bash -c 'sharded "$@"' sharded ${SHARDED_CPU[@]+"${SHARDED_CPU[@]}"}
# torchrun starts its workers in sessions of their own, out of reach of timeout's kill: where the part was cut,
# stop any that sample on, so that nothing shares the GPU with the throughput timings
pkill -f -- "$SHARDED_DIR/" 2>/dev/null || true

# ecar-xl is the preset the issue-5 targets name; batch 64 first so the target rows come first; then the
# attention + shortcut head at 2 steps per stage (issue 13), whose rows are the first to go if time runs out
part throughput "$T_THROUGHPUT" "$PY" -m benchmarks.throughput --models ecar-xl ecar-xl-attn-sc@2 --batches 64 1 8 256 \
    --variant-batches 64 1 --repeats 3 --max-call-s 10 --profile "$OUTDIR" \
    --json "$OUTDIR/throughput.json" --markdown "$OUTDIR/throughput.md" ${THROUGHPUT_CPU[@]+"${THROUGHPUT_CPU[@]}"}

log "done in ${SECONDS}s; results in $OUTDIR"
pack
