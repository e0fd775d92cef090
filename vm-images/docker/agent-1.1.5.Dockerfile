# Demo for `nsmatrix signoff-image`: an agent image before the setuid fix ("1.1.5").
# Debian bookworm (BASE: the root filesystem nsmatrix imports), Node from Debian, Codex from
# the npm registry, bubblewrap as Debian ships it, a non-root user with uid 1000.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm bubblewrap ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Codex 0.171.0 from the npm registry's own tarballs (nsmatrix puts them in the build context,
# integrity-verified: build containers here cannot reach the registry over TLS). The second
# package is the launcher's optional dependency `@openai/codex-linux-x64`, which
# `npm install -g @openai/codex` fetches itself where the registry is reachable.
COPY nsmatrix-npm/ /tmp/codex-npm/
RUN npm install -g --offline --no-audit --no-fund \
      /tmp/codex-npm/openai-codex-0.171.0.tgz \
      @openai/codex-linux-x64@file:/tmp/codex-npm/openai-codex-0.171.0-linux-x64.tgz \
 && rm -rf /tmp/codex-npm /root/.npm \
 && codex --version
RUN useradd --create-home --uid 1000 --user-group user
USER user
WORKDIR /home/user
