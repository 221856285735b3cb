#!/usr/bin/env bash
# Dovecot for the IMAP connector tests. The tests start their own instance (throwaway config,
# ephemeral loopback port); only the binaries are needed here, not the system service.
# dovecot-core's auth process has the oauth2 passdb the XOAUTH2 tests configure.
set -euo pipefail
if ! command -v dovecot >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd
fi
