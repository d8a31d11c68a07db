# Test-only stand-ins for the images that infra/compose.yaml pulls from a registry, built from
# Debian and PyPI packages alone (for machines that reach no container registry), and the
# shared Python + PyTorch base of the retrain image. Built by benchmarks/infra_up.sh:
#
#   python    Debian bookworm + Python in /opt/venv (first on PATH), the CA bundle pip uses
#   torch     python + torch/torchvision as PyPI has them: BASE_IMAGE of infra/Dockerfile
#   postgres  Debian's PostgreSQL behind the official image's environment (POSTGRES_USER, ...)
#   s3        moto's S3 server behind MinIO's command line (`minio server`, `mc ready|alias|mb`)
#   prefect   prefect from PyPI, as in prefecthq/prefect
#
# Context: infra/test/ with ca.crt (the machine's CA bundle, copied there by the script).
# The classic builder (no BuildKit) builds every stage before the target: torch comes last.

ARG DEBIAN_IMAGE=retrain-test/debian:bookworm

FROM ${DEBIAN_IMAGE} AS python
COPY ca.crt /etc/ssl/certs/retrain-test-ca.crt
ENV PIP_CERT=/etc/ssl/certs/retrain-test-ca.crt \
    SSL_CERT_FILE=/etc/ssl/certs/retrain-test-ca.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && python3 -m venv /opt/venv

FROM ${DEBIAN_IMAGE} AS postgres
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]

FROM python AS s3
ARG MOTO_VERSION=">=5,<6"
RUN pip install "moto[server]${MOTO_VERSION}"
COPY minio /usr/local/bin/minio
COPY mc /usr/local/bin/mc
ENTRYPOINT ["minio"]

FROM python AS prefect
ARG PREFECT_VERSION=3.9.1
RUN pip install "prefect==${PREFECT_VERSION}"

FROM python AS torch
# TORCH_REQUIREMENTS: the versions to install (the build script pins those of the project's
# own environment); TORCH_PIP_ARGS: where else pip may find them (the build script serves
# this machine's local package index over HTTP, so the wheels are not downloaded again).
ARG TORCH_REQUIREMENTS="torch torchvision"
ARG TORCH_PIP_ARGS=""
RUN pip install ${TORCH_PIP_ARGS} ${TORCH_REQUIREMENTS} \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
