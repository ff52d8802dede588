#!/usr/bin/env bash
# The Optuna studies' database in the compose `postgres` service: role `optuna` (password from
# OPTUNA_DB_PASSWORD, never written here) owning database `optuna`, which the Ray containers reach
# as PRUNETUNE_STUDY_STORAGE. Neither the optuna role nor the public may connect to MLflow's
# database ($POSTGRES_DB), and only the owner to optuna: the Ray jobs hold this password, and a
# known password must not go around MLflow's authentication.
#
# postgres's entrypoint runs it once, on an empty data volume (/docker-entrypoint-initdb.d). On a
# volume made before, run it by hand (it is safe to run again, and sets the password again):
#   docker compose -f docker/compose.yaml exec postgres bash /docker-entrypoint-initdb.d/optuna.sh
set -euo pipefail
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD (e.g. export OPTUNA_DB_PASSWORD=\$(openssl rand -hex 16))}"
psql -v ON_ERROR_STOP=1 -v password="$OPTUNA_DB_PASSWORD" -v mlflow_db="$POSTGRES_DB" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
SELECT 'CREATE ROLE optuna LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'optuna')\gexec
ALTER ROLE optuna WITH LOGIN PASSWORD :'password';
SELECT 'CREATE DATABASE optuna OWNER optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec
REVOKE CONNECT ON DATABASE optuna FROM PUBLIC;
REVOKE CONNECT ON DATABASE :"mlflow_db" FROM PUBLIC;
SQL
