"""The compiled extensions load and build_info() describes this build consistently.

Set JAX_EP_EXPECT_CUDA=1 (or 0) to also assert how the build was made, e.g.
on a CI job that must (or must not) have compiled the CUDA ops.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from jax_ep.cuda import extension


def test_cpu_extension_imports():
    from jax_ep import _jax_ep_cpu

    facts = _jax_ep_cpu.build_info()
    assert isinstance(facts["compiler"], str) and facts["compiler"]
    # Handlers must be built with the FFI headers of the oldest jaxlib we
    # support (0.11.2 ships API 0.4); newer headers are refused at run time.
    assert facts["ffi_api_version"] == (0, 4)


def test_build_info_keys_and_types():
    info = extension.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["nvshmem"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert all(isinstance(a, str) for a in info["cuda_archs"])
    assert isinstance(info["version"], str)
    assert isinstance(info["ffi_targets"], list)
    assert all(isinstance(t, str) for t in info["ffi_targets"])


def test_version_matches_package():
    import jax_ep

    assert extension.build_info()["version"] == jax_ep.__version__
    assert extension.build_info()["version"] == extension.build_info()["version"].strip()


def test_cuda_flag_is_consistent():
    info = extension.build_info()
    module_present = importlib.util.find_spec("jax_ep._jax_ep_cuda") is not None
    assert info["cuda"] == module_present == info["cuda_built"] == extension.cuda_available()
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must report its architectures"
        assert "jax_ep_get_dispatch_layout" in info["ffi_targets"]
    else:
        assert info["cuda_archs"] == [] and info["ffi_targets"] == []
    nvshmem_present = importlib.util.find_spec("jax_ep._jax_ep_nvshmem") is not None
    assert nvshmem_present == info["nvshmem_built"]
    # Built but not loadable only when libnvshmem_host.so.3 (nvidia-nvshmem-cu13) is missing.
    assert info["nvshmem"] == extension.nvshmem_available()
    assert not info["nvshmem"] or nvshmem_present
    if info["nvshmem"]:
        assert info["cuda"], "the NVSHMEM module is only built with the CUDA one"
        assert "jax_ep_ll_dispatch" in info["ffi_targets"]
        assert "jax_ep_ll_combine" in info["ffi_targets"]
        assert len(info["nvshmem_version"]) == 3 and info["nvshmem_version"][0] == 3
    else:
        assert info["nvshmem_version"] is None


@pytest.mark.skipif("JAX_EP_EXPECT_CUDA" not in os.environ, reason="JAX_EP_EXPECT_CUDA not set")
def test_cuda_matches_expectation():
    assert extension.build_info()["cuda"] == (os.environ["JAX_EP_EXPECT_CUDA"] == "1")


@pytest.mark.skipif("JAX_EP_EXPECT_NVSHMEM" not in os.environ,
                    reason="JAX_EP_EXPECT_NVSHMEM not set")
def test_nvshmem_matches_expectation():
    assert extension.build_info()["nvshmem"] == (os.environ["JAX_EP_EXPECT_NVSHMEM"] == "1")


def test_import_registers_nothing():
    # Registration must happen on first use, not at `import jax_ep`.
    code = (
        "import jax_ep, jax_ep.cuda.extension as f\n"
        "assert f._registered_targets == (), f._registered_targets\n"
        "if f.cuda_available():\n"
        "    f.register_targets(); f.register_targets()\n"
        "    assert 'jax_ep_get_dispatch_layout' in f._registered_targets\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_build_info_reports_the_versions_in_use():
    import jax
    import jaxlib

    info = extension.build_info()
    assert info["jax_version"] == jax.__version__ and info["jaxlib_version"] == jaxlib.__version__
    if info["nvshmem"]:
        assert len(info["nvshmem_runtime_version"]) == 3, info
        assert info["nvshmem_runtime_version"][:2] >= info["nvshmem_version"][:2], info


def test_an_nvshmem_host_library_older_than_the_build_is_refused(monkeypatch):
    if extension._load("_jax_ep_nvshmem", "") is None:
        pytest.skip("no NVSHMEM module in this build")
    monkeypatch.setattr(extension, "_nvshmem_host_version", lambda path: (3, 0, 0))
    with pytest.warns(RuntimeWarning, match="older than the .* jax_ep was built against"):
        assert extension._nvshmem_module.__wrapped__() is None
