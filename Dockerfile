# One image for every lightpd service of compose.yaml: the control plane (the
# default command), prefill and decode nodes (`python -m lightpd.prefill_node|decode_node`),
# `lightctl` and the node health check. torch and Triton are the line our GPU
# figures were measured with (docs/benchmarks.md: torch 2.11.0+cu130, Triton 3.6,
# Python 3.12 on Ubuntu 24.04). The CUDA libraries come with the torch wheel
# (CUDA 13.0.2), the driver from the host (NVIDIA Container Toolkit, driver 580+).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

# Triton compiles a small C launcher for each kernel signature at run time: it needs
# a C compiler and Python's headers in the image, not only at build time.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3.12 python3.12-dev python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/lightpd \
    PATH=/opt/lightpd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Later installs (the project's dependencies, anyone's `pip install`) keep these.
    PIP_CONSTRAINT=/opt/lightpd/constraints.txt \
    # Models are local folders; nothing is fetched from the Hugging Face Hub.
    HF_HUB_OFFLINE=1 \
    # In a container the control plane must listen beyond loopback to be reached.
    LIGHTPD_HOST=0.0.0.0

# torch from the PyTorch index only (never a same-named package elsewhere), in its
# own layer, so a change of the sources does not download it again.
RUN python3.12 -m venv /opt/lightpd \
    && printf 'torch==2.11.0\ntriton==3.6.0\n' > /opt/lightpd/constraints.txt \
    && pip install --index-url https://download.pytorch.org/whl/cu130 torch==2.11.0 triton==3.6.0

WORKDIR /src
# Exact versions from the lock (torch and triton are the layer above), then lightpd
# itself without resolving anything again: a release elsewhere cannot change the image.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY lightpd ./lightpd
RUN pip install --no-deps . && python -c "import torch, triton; print(torch.__version__, triton.__version__)"

# Triton keeps its compiled kernels under $HOME, so the user gets one. The folder of
# the default model is the mount point of compose.yaml's `tiny-llama` volume: a new
# volume takes its owner, so `lightctl model tiny` may write there.
RUN useradd --create-home lightpd \
    && mkdir -p /models/tiny-llama \
    && chown lightpd:lightpd /models/tiny-llama
USER lightpd
WORKDIR /home/lightpd

EXPOSE 8000
CMD ["python", "-m", "lightpd.controlplane"]
