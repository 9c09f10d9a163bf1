# One image for every role: the control plane (the default command), prefill nodes
# (`python -m prefill_node ...`) and decode nodes (`python -m decode_node ...`).
# compose.yaml runs the three together. The base image brings CUDA, torch and
# Triton, so `pip install` adds only the rest.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # In a container the control plane must listen beyond loopback to be reached.
    LIGHTPD_HOST=0.0.0.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY kernels ./kernels
COPY controlplane ./controlplane
COPY prefill_node ./prefill_node
COPY decode_node ./decode_node
RUN pip install .

# Triton keeps its compiled kernels under $HOME, so the user gets one.
RUN useradd --create-home lightpd
USER lightpd
WORKDIR /home/lightpd

EXPOSE 8000
CMD ["python", "-m", "controlplane"]
