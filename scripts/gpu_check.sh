#!/usr/bin/env bash
# GPU check on a lent CUDA machine, from a fresh copy of the repo:
#
#     bash scripts/gpu_check.sh            # ~5-8 min
#     bash scripts/gpu_check.sh --quick    # 3 steps per run, ~4 min
#
# Prints nvidia-smi and the versions, runs `pytest -m gpu` (tests/test_gpu.py: bf16 steps on
# four families, 4-bit QLoRA with bitsandbytes on CUDA, adapter round trip, the bundled
# model end to end) and the speed benchmark (this engine vs TRL) on the bundled model and
# on the larger config, in bf16 and in 4-bit (QLoRA), printing the figures; JSON results
# and the log go to bench/out/gpu/ (or $GPU_OUT).
#
# Packages, in this order:
# - Wheels in .whl/ (the lent machines have no network: download them here, see
#   docs/performance.md, "GPU") are unpacked into /tmp/ttrv-site and put first on PYTHONPATH.
#   They must not include torch: the machine's CUDA build of torch is kept.
# - Otherwise pip installs the requirements without the torch pin; offline, pip fails and
#   the script carries on with what is installed, printing the versions.
# - torch: a python3 that already has a CUDA-enabled torch keeps it (reinstalling
#   torch==2.13.0 could pull a CPU build from a local wheel cache); never torchvision.
# - Models are built locally from config (bench/out/models); nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=6
[ "${1:-}" = "--quick" ] && STEPS=3
OUT=${GPU_OUT:-bench/out/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

echo "== nvidia-smi"
if ! nvidia-smi; then
    echo "nvidia-smi failed: this is not a CUDA machine" >&2
    exit 1
fi

echo "== install"
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=/tmp/ttrv-site
    rm -rf "$SITE" && mkdir -p "$SITE"
    for w in .whl/*.whl; do
        $PY -m zipfile -e "$w" "$SITE" && echo "unpacked $(basename "$w")"
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "keeping the installed CUDA torch $($PY -c 'import torch; print(torch.__version__)')"
    else
        $PY -m pip install -q torch==2.13.0 || echo "!! could not install torch==2.13.0" >&2
    fi
    REQ=$(mktemp)
    grep -hv -e '^[[:space:]]*-r' -e '^[[:space:]]*torch==' -e '^[[:space:]]*#' -e '^[[:space:]]*$' \
        requirements.txt requirements-dev.txt requirements-bench.txt >"$REQ"
    $PY -m pip install -q -r "$REQ" ||
        echo "!! pip install failed (offline?): carrying on with the installed packages" >&2
    rm -f "$REQ"
fi
$PY - <<'EOF'
import importlib
import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name(0)}")
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} missing ({type(exc).__name__})")
EOF
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "torch does not see a GPU: stopping. A CPU build (+cpu) satisfies torch==2.13.0 too;" >&2
    echo "replace it with PyPI's CUDA build: pip install --force-reinstall torch==2.13.0" >&2
    exit 1
fi

STATUS=0
echo "== pytest -m gpu"
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
rc=$?
if [ $rc -eq 5 ]; then
    echo "(no test is marked gpu)"
elif [ $rc -ne 0 ]; then
    STATUS=1
fi

ENGINES="ours trl"
if ! $PY -c 'import trl' 2>/dev/null; then
    echo "!! trl is not importable: timing this engine only" >&2
    ENGINES="ours"
fi
echo "== speed: bundled model, CUDA, bf16, $STEPS steps"
timeout 150 $PY -m bench.speed --model bundled --engine $ENGINES --device cuda --dtype bfloat16 \
    --steps "$STEPS" --json "$OUT/speed-bundled-bf16.json" || STATUS=1
for QUANT in none 4bit; do
    echo "== speed: large config, CUDA, bf16, quantization $QUANT, $STEPS steps"
    timeout 150 $PY -m bench.speed --model large --engine $ENGINES --device cuda --dtype bfloat16 \
        --quantization "$QUANT" --steps "$STEPS" --json "$OUT/speed-bf16-$QUANT.json" || STATUS=1
done
echo "== speed: xl config (~0.5 B, 32k vocabulary), CUDA, bf16, $STEPS steps"
# Big enough that the GPU computes rather than waits on kernel launches. Random weights:
# both engines sample only the option letters and EOS, as for the large config.
timeout 240 $PY - "$STEPS" "$OUT/speed-xl-bf16.json" "$ENGINES" <<'XL' || STATUS=1
import dataclasses, json, sys
from bench import speed

steps, out, engines = int(sys.argv[1]), sys.argv[2], sys.argv[3].split()
xl = dict(speed.LARGE, text_hidden=1536, text_layers=16, text_heads=12, text_kv_heads=4,
          text_mlp=4096, vocab=32000)
folder = speed.build_llava(speed.bundled_model_dir()[0], speed.MODEL_DIR / "llava-xl", **xl)
spec = speed.Spec(model_dir=str(folder), label="xl", restrict_answers=True, steps=steps,
                  device="cuda", dtype="bfloat16")
rows = []
for engine in engines:
    try:
        rows.append(speed.summarise([speed.run_worker(engine, spec)], spec.warmup))
    except Exception as exc:  # noqa: BLE001 - report and keep the other engine's figures
        print(f"!! xl {engine}: {exc}", file=sys.stderr)
if rows:
    speed.print_table("xl", spec, rows)
with open(out, "w") as f:
    json.dump({"spec": dataclasses.asdict(spec), "summary": rows}, f, indent=1)
sys.exit(0 if len(rows) == len(engines) else 1)
XL
echo "== done, status $STATUS"
exit $STATUS
