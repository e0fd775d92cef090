ARG BASE
FROM ${BASE}
RUN dpkg --purge bubblewrap && ! command -v bwrap && useradd --create-home --uid 1000 --user-group user
