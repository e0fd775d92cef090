ARG BASE
FROM ${BASE}
# Debian's bwrap exactly as packaged (0755), and the unprivileged user Codex runs as.
RUN chmod 0755 /usr/bin/bwrap && useradd --create-home --uid 1000 --user-group user
