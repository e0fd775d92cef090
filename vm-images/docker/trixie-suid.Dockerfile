ARG BASE
FROM ${BASE}
# The same fix on a newer base: bwrap 0.12.0 refuses to run setuid.
RUN chmod u+s /usr/bin/bwrap && useradd --create-home --uid 1000 --user-group user
