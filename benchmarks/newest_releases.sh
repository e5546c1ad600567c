#!/usr/bin/env bash
# The test suite on the newest releases the registry serves, in fresh venvs, before users meet them:
#   bounded:    the newest releases within setup.py's bounds (what `pip install p2p-engine` gives a user today);
#   unbounded:  the same with every upper bound lifted (what the next bound change would admit).
# Each mode installs a clean clone of HEAD (editable, as CI does, without constraints.txt), prints the releases it
# got and runs the suite; at the end, per mode, the releases and what broke. Where unbounded resolves to exactly
# the bounded set, it is not run twice. This machine's pip cap (/etc/xdg/pip: torch <= 2.14.1 from local disk) is
# ignored here (PIP_CONFIG_FILE=/dev/null), so the newest torch is the registry's (a CUDA build, several GB the
# first time; it runs on the CPU).
#   bash benchmarks/newest_releases.sh [pytest arguments]     (about 15 minutes of tests a mode on 2 cores)
#   MODES="unbounded" bash benchmarks/newest_releases.sh       (one mode)
# Where a release breaks the engine: fix the engine where the release is right; where it is wrong, bound it in
# setup.py with the reason beside the bound.
set -uo pipefail
PYTHON=${PYTHON:-python3}
MODES=${MODES:-"bounded unbounded"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD)  # what the clones hold (HEAD may move while the suites run)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
KEY="torch|triton|transformers|diffusers|numpy|safetensors|pillow|tqdm|kernels|tokenizers|huggingface.hub|pytest|pytest.benchmark|fastapi|uvicorn|starlette|pydantic|python.multipart|playwright|httpx"

summary=""
for mode in $MODES; do
    dir="$WORK/$mode"
    git clone -q "$REPO" "$dir/repo"
    if [ "$mode" = unbounded ]; then
        # every "<..." of setup.py's requirement strings dropped: lower bounds stay
        sed -i -E 's/"([A-Za-z0-9_.-]+>=[^",<]+),<[^"]*"/"\1"/g' "$dir/repo/setup.py"
    fi
    grep -oE '"[A-Za-z0-9_.-]+(>=|<=|==|<|>)[^"]*"' "$dir/repo/setup.py" | tr '\n' ' ' > "$dir/requirements.txt"
    "$PYTHON" -m venv "$dir/venv"
    "$dir/venv/bin/pip" install -q --upgrade pip
    echo "== $mode: installing ($(cat "$dir/requirements.txt"))"
    if ! (cd "$dir/repo" && "$dir/venv/bin/pip" install -q -e ".[test]") >"$dir/install.log" 2>&1; then
        tail -20 "$dir/install.log"
        summary+="$mode: INSTALL FAILED (see above)"$'\n'
        continue
    fi
    "$dir/venv/bin/pip" freeze --exclude-editable | grep -v '^-e' | sort > "$dir/freeze.txt"
    releases=$(grep -iE "^($KEY)==" "$dir/freeze.txt" | tr '\n' ' ')
    echo "== $mode: $("$dir/venv/bin/python" --version) $releases"
    if [ "$mode" = unbounded ] && [ -f "$WORK/bounded/freeze.txt" ] && cmp -s "$WORK/bounded/freeze.txt" "$dir/freeze.txt"; then
        summary+="$mode: the same releases as bounded (nothing past an upper bound is published): not run twice"$'\n'
        continue
    fi
    if [ "$mode" = unbounded ] && [ -f "$WORK/bounded/freeze.txt" ]; then
        echo "== $mode: past the bounds: $(diff "$WORK/bounded/freeze.txt" "$dir/freeze.txt" | grep '^>' | cut -c3- | tr '\n' ' ')"
    fi
    start=$(date +%s)
    (cd "$dir/repo" && "$dir/venv/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@") > "$dir/pytest.log" 2>&1
    rc=$?
    tail -3 "$dir/pytest.log"
    broke=$(grep -E '^(FAILED|ERROR) ' "$dir/pytest.log" | cut -c1-300)
    summary+="$mode ($(( $(date +%s) - start )) s, exit $rc): $(tail -1 "$dir/pytest.log")"$'\n'"  releases: $releases"$'\n'
    [ -n "$broke" ] && summary+="  what broke:"$'\n'"$(echo "$broke" | sed 's/^/    /')"$'\n'
done
echo
echo "== newest releases, $(date -u +%Y-%m-%d), at $COMMIT"
printf '%s' "$summary"
