#!/usr/bin/env bash
# The GPU check: on a CUDA host with PyTorch, Triton and transformers, which downloads nothing. From the repository's
# root, about 5 minutes on an H100 or H200:
#
#     bash tests/gpu_check.sh
#
# 1. the CUDA-marked tests (tests/test_cuda.py: CUDA graphs against eager steps, batch invariance with graphs on
#    and off, bfloat16 against transformers) and the float32 parity tests of Llama and Cohere against transformers,
#    on the GPU (--device cuda);
# 2. python -m engine.bench_cuda: a random-weight model of Llama-2-7B's shape in bfloat16 at 1, 64 and 256
#    sequences beside transformers' generate, the targets, and the profile of a decode step below them;
# 3. the GPU, torch, CUDA and Triton versions, the attention kernel and the CUDA graphs' batch sizes (printed by 2).
#
# The engine imports two packages that such a host may lack: gguf and llguidance (pytest and transformers too, where
# they are missing). Bring their wheels in .whl/ (on a machine with network:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#         --platform manylinux_2_17_x86_64 -d .whl gguf llguidance
# ); they are installed into a private folder, nothing else changes on the host. Seen to work: gguf 0.19.0 and
# llguidance 1.6.0 for Python 3.12. Both steps run even if the first fails; the output is long (the profile), so
# keep it whole: bash tests/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # tests/conftest.py runs Triton under its CPU interpreter unless told otherwise
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nanoserve-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/nanoserve-site"
fi
missing=$(python3 -c "import importlib.util as u; print(*[m for m in ('torch', 'triton', 'transformers', 'pytest',
    'gguf', 'llguidance', 'tokenizers', 'safetensors', 'jinja2') if u.find_spec(m) is None])")
if [ -n "$missing" ]; then
    echo "missing Python packages: $missing (bring their wheels in .whl/, see the top of $0)" >&2
    exit 2
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

echo "== 1. CUDA tests and parity against transformers on the GPU"
tests=0
timeout 240 python3 -m pytest -q -p no:cacheprovider --device cuda \
    tests/test_cuda.py tests/test_llama_parity.py tests/test_cohere_parity.py || tests=$?

echo "== 2. Llama-2-7B's shape, random bfloat16 weights: ours against transformers' generate"
bench=0
timeout 300 python3 -m engine.bench_cuda "$@" || bench=$?
echo "== tests exit $tests, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
