# Sourced by scripts/demo and scripts/test (run from the repository root): makes or refreshes
# the repository's .venv.

# ensure_venv EXTRAS: install `-e .[EXTRAS]` into .venv unless the stamp says that this very
# pyproject.toml is already installed there with at least those extras.
ensure_venv() {
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # Under a lock, so that scripts/demo and scripts/test started together run pip once.
    (
        if command -v flock >/dev/null; then flock 9; fi
        local need=$1 stamp=.venv/.cascada-stamp hash have extra
        hash=$(python3 -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
        if [[ -f $stamp && $(sed -n 1p "$stamp") == "$hash" ]]; then
            have=",$(sed -n 2p "$stamp"),"
            for extra in ${need//,/ }; do
                [[ $have == *",$extra,"* ]] || have=""
            done
            [[ -n $have ]] && exit 0
        fi
        echo "${0##*/}: installing cascada${need:+[$need]} into .venv (new .venv, or pyproject.toml changed)" >&2
        if [[ ",$need," == *",torch,"* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
            # A bare "torch" requirement pulls a multi-GB CUDA build from PyPI. Take the
            # release named by CASCADA_TORCH first (default 2.13.0, whose CPU build the project's
            # machines keep on disk); the extra's range is then already met. Install your own
            # torch into .venv beforehand to keep it.
            .venv/bin/pip install -q "${CASCADA_TORCH:-torch==2.13.0}" 2>&1 \
                | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
        fi
        # pip warns about every configured local index it skips; only that line is noise.
        .venv/bin/pip install -q -e ".${need:+[$need]}" 2>&1 \
            | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
        printf '%s\n%s\n' "$hash" "$need" >"$stamp"
    ) 9>.venv/.cascada-lock
}
