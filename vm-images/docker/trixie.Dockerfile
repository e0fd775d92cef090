ARG BASE
FROM ${BASE}
RUN chmod 0755 /usr/bin/bwrap && useradd --create-home --uid 1000 --user-group user
