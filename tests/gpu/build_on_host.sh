# Source from the repository root on a GPU host without a package index:
#   . tests/gpu/build_on_host.sh
# Builds this checkout from scratch against the installed jax / nanobind /
# nvidia-nvshmem-cu13 (no build isolation), puts the extension modules next
# to the sources, and exports what the GPU tests and benchmarks need.
# Build log: $OUT/build.log when OUT is set, else /tmp/jax_ep_build.log.
_log="${OUT:-/tmp}/build.log"
[ -n "${OUT:-}" ] || _log=/tmp/jax_ep_build.log
rm -rf /tmp/jax_ep_inst
if python3 -m pip install --no-build-isolation --no-deps --target /tmp/jax_ep_inst . >"$_log" 2>&1; then
  cp /tmp/jax_ep_inst/jax_ep/_jax_ep_*.so jax_ep/
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  LD_LIBRARY_PATH="$(python3 -c 'import nvidia.nvshmem as m; print(m.__path__[0])')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
  echo "jax_ep built from $(pwd) ($(python3 -c 'import jax_ep; print(jax_ep.__version__)'))"
else
  echo "jax_ep build failed; see $_log" >&2
  tail -40 "$_log" >&2
  false
fi
