"""The steps of a classification job, in the order they run, each one Airflow task and safe to retry:

- `ingest`: the source (checked by `pipelines.sources`), within the account's limits (`pipelines.admission`),
  stored in the account's raw area
- `validate`: the gate and the expectations; a refused file goes to quarantine
- `classify`: tiled on Dask
- `export`: the classified points, summaries, preview, report, manifest last
- `meter`: close the job and record its one usage event
- `deliver`: the e-mail that the results are ready (a job its run did not meter is metered first)

`record` holds the job record and its state machine, which every step reads first.
"""
