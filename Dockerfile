# The Hugging Face Space (README front matter: sdk: docker, app_port: 7860).
# Local try-out: docker build -t hass-studio . && docker run -p 7860:7860 -e SPACE_ID=local/hass-studio hass-studio
FROM python:3.11-slim

# A C compiler for the rows kernel (hass/rowkernel.py), the CPU default: built once, at the
# model step below. Without one the studio runs on oneDNN's kernels, slower.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

# Spaces run the container as user 1000; everything it writes lives under its home.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HASS_CACHE=/home/user/.cache/hass-studio \
    GRADIO_SERVER_PORT=7860
WORKDIR /home/user/app

# the project's own install recipe (tools/install.sh), CPU-only torch
COPY --chown=user requirements.txt requirements-data.txt requirements-dev.txt ./
COPY --chown=user tools/install.sh tools/install.sh
RUN python -m venv /home/user/venv && \
    TORCH_INDEX=https://download.pytorch.org/whl/cpu PIP_FLAGS=--no-cache-dir sh tools/install.sh python runtime

COPY --chown=user . .
# dequantise the default model (and build the rows kernel) once at build time, so a cold start
# does not wait ~20 s for them
RUN python -c "from hass.target import load_target; print(load_target('default').kernels)"

EXPOSE 7860
# SPACE_ID (set by Spaces) makes app.py bind 0.0.0.0 and lock the model for visitors
CMD ["python", "app.py"]
