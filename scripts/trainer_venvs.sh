#!/usr/bin/env bash
# Build (once per machine) the virtual environment of a trainer that profit-prep exports for:
#   bash scripts/trainer_venvs.sh llamafactory|axolotl|ms-swift ...
# Each lands in $PROFIT_PREP_TRAINER_VENVS (default ~/.cache/profit-prep/trainer-venvs) as
# <trainer>-<version>, with the CPU torch kept by a constraints file (a bare install replaces it
# with a CUDA build and its NVIDIA libraries). A finished venv has a .ready file and is reused;
# the last line printed per trainer is the venv's path.
# Exit status 75: the package registry is unreachable (tests skip on it); anything else non-zero
# is a real failure.
set -euo pipefail
root="${PROFIT_PREP_TRAINER_VENVS:-$HOME/.cache/profit-prep/trainer-venvs}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

declare -A versions=([llamafactory]=0.9.5 [axolotl]=0.19.0 [ms-swift]=4.6.0)
declare -A packages=([llamafactory]=llamafactory [axolotl]=axolotl [ms-swift]=ms-swift)

registry_reachable() {
    "$python" - <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=20).close()
except Exception as e:
    print(f"trainer_venvs: registry unreachable: {e}", file=sys.stderr)
    sys.exit(1)
PY
}

build() {
    local name=$1 version=${versions[$1]:-}
    [ -n "$version" ] || { echo "trainer_venvs: unknown trainer $name" >&2; exit 2; }
    local venv="$root/$name-$version"
    if [ -f "$venv/.ready" ]; then echo "$venv"; return; fi
    mkdir -p "$root"
    exec 9>"$venv.lock"
    flock 9  # a second caller (another test run) waits for the first build instead of racing it
    if [ -f "$venv/.ready" ]; then echo "$venv"; return; fi
    registry_reachable || exit 75
    local start=$SECONDS
    rm -rf "$venv"  # an unfinished build of ours (no .ready): start over
    "$python" -m venv "$venv"
    local pip=("$venv/bin/python" -m pip)
    "${pip[@]}" install -q --upgrade pip
    # The constraints keep the CPU torch: trainers' own requirements would pull CUDA builds.
    printf 'torch==2.13.0\ntorchvision==0.28.0\n' >"$venv/constraints.txt"
    "${pip[@]}" install -q torch==2.13.0
    "${pip[@]}" install -q -c "$venv/constraints.txt" "${packages[$name]}==$version"
    # CUDA builds of torchvision/torchaudio pulled in by the trainers break their imports on CPU;
    # text training needs neither.
    "${pip[@]}" uninstall -q -y torchvision 2>/dev/null || true
    rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so
    case $name in
        llamafactory) "$venv/bin/python" -c "import llamafactory" ;;
        axolotl) "$venv/bin/python" -c "import axolotl" ;;
        ms-swift) "$venv/bin/python" -c "import swift" ;;
    esac
    echo $((SECONDS - start)) >"$venv/.install_seconds"
    "$venv/bin/python" -m pip freeze >"$venv/.freeze"
    touch "$venv/.ready"
    echo "trainer_venvs: $name $version built in $((SECONDS - start)) s" >&2
    echo "$venv"
}

[ $# -gt 0 ] || { echo "usage: $0 llamafactory|axolotl|ms-swift ..." >&2; exit 2; }
for t in "$@"; do build "$t"; done
