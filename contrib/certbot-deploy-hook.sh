#!/bin/sh
# certbot deploy hook: copy the renewed certificate where the dsreceiver account can read it.
# certbot's own privkey.pem is readable by root only.  Install:
#   install -m 0755 contrib/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/dsreceiver.sh
# dsreceiver notices the new files within --cert-check-interval; the reload makes it immediate.
set -eu
install -d -m 0750 -o root -g dsreceiver /etc/dsreceiver/certs
install -m 0644 -o root -g dsreceiver "$RENEWED_LINEAGE/fullchain.pem" /etc/dsreceiver/certs/fullchain.pem.new
install -m 0640 -o root -g dsreceiver "$RENEWED_LINEAGE/privkey.pem" /etc/dsreceiver/certs/privkey.pem.new
mv /etc/dsreceiver/certs/privkey.pem.new /etc/dsreceiver/certs/privkey.pem
mv /etc/dsreceiver/certs/fullchain.pem.new /etc/dsreceiver/certs/fullchain.pem
systemctl reload dsreceiver || true
