#!/bin/sh
# One-shot seed of the compose stack (runs in the dovecot image, as root):
#   /out/tls  server.pem + server.key for Dovecot, for the name "dovecot"
#   /out/ca   ca.pem, the throw-away CA that signed it (the connector's tls_ca_file)
#   /srv/mail the sample mails of /seed/mail/<user>/ into <user>'s Maildir, owned by vmail (1000)
# Each part is done once per volume: `docker compose down -v` starts over.
set -eu

if [ ! -s /out/tls/server.pem ] || [ ! -s /out/ca/ca.pem ]; then
  work=$(mktemp -d)
  # A CA plus a leaf with proper extensions: strict verifiers reject ad-hoc self-signed leaves.
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 \
    -subj "/CN=pop3-kafka compose demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=dovecot" \
    -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:dovecot,DNS:localhost" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" > "$work/server.ext"
  openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null
  install -m 0644 "$work/server.pem" /out/tls/server.pem
  install -m 0600 "$work/server.key" /out/tls/server.key
  install -m 0644 "$work/ca.pem" /out/ca/ca.pem
  rm -rf "$work" # the CA key is not kept: nothing else is ever signed with it
  echo "seed: certificate for dovecot written"
fi

for src in /seed/mail/*/; do
  user=$(basename "$src")
  maildir="/srv/mail/$user/Maildir"
  [ -d "$maildir" ] && continue
  mkdir -p "$maildir/cur" "$maildir/new" "$maildir/tmp"
  n=0
  for mail in "$src"*.eml; do
    n=$((n + 1))
    # Maildir delivery: write under tmp/, then rename into new/ (Dovecot gives UIDs at its next sync).
    name="$(date +%s).seed$n.compose"
    cp "$mail" "$maildir/tmp/$name"
    mv "$maildir/tmp/$name" "$maildir/new/$name"
  done
  chown -R 1000:1000 "/srv/mail/$user"
  echo "seed: $n mails for $user"
done
