#!/bin/sh
# Entrypoint of the Fleetmark images. Secrets come from files (Docker/Compose secrets,
# Kubernetes Secret volumes, systemd credentials): for each VAR below, VAR_FILE names a file
# whose content (without the trailing newline) becomes VAR, as the postgres image does it.
# Setting both VAR and VAR_FILE is refused, so a stale value never wins silently.
# Then runs the command given (a fleetmark binary).
set -eu
for var in DATABASE_URL PGPASSWORD FLEETMARK_TOKEN; do
  file_var="${var}_FILE"
  eval "file=\${$file_var:-}"
  eval "value=\${$var:-}"
  [ -n "$file" ] || continue
  if [ -n "$value" ]; then
    echo "error: both $var and $file_var are set; set only one" >&2
    exit 64
  fi
  if [ ! -r "$file" ]; then
    echo "error: $file_var=$file is not a readable file" >&2
    exit 66
  fi
  value=$(cat "$file")
  if [ -z "$value" ]; then
    echo "error: $file_var=$file is empty" >&2
    exit 66
  fi
  export "$var=$value"
  unset "$file_var"
done
[ $# -gt 0 ] || { echo "error: no command given" >&2; exit 64; }
exec "$@"
