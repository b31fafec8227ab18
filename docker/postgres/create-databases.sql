-- Run once by the postgres image when its data volume is new. POSTGRES_DB creates Airflow's
-- database; pointflow's catalog gets its own, because both keep an `alembic_version` table.
CREATE DATABASE pointflow;
