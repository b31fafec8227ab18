"""Train a customer's own classifier from labelled LAS/LAZ files.

Trigger with conf {"account_id": "...", "sources": ["/path/a.laz", "s3://bucket/b.laz"]}. The model
is scored against the standard classifier on held-out blocks of the labels and, if it beats it, stored
in the account's models area with its evaluation and can then be given as `classifier` to
pointflow_classify runs of the same account only. If it does not, the run still succeeds: its result
says `"offered": false` with both sets of figures, and nothing is stored. Either way the account is
e-mailed the outcome with the figures, once per run.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task


@dag(
    dag_id="pointflow_train",
    schedule=None,
    catchup=False,
    # Triggered runs start at once on a fresh deployment (a paused DAG queues them for good).
    is_paused_upon_creation=False,
    tags=["pointflow"],
    params={
        "account_id": Param("demo", type="string", description="account that owns the labels and the model"),
        "sources": Param(
            [],
            type="array",
            items={"type": "string"},
            description="labelled LAS/LAZ files: local paths, file:// or s3:// URIs",
        ),
        # Class codes as numbers: a code given as text ("1") matched no label, so the class was
        # trained on while the model recorded it as left out.
        "ignore_classes": Param(
            [0, 1],
            type="array",
            items={"type": "integer", "minimum": 0, "maximum": 255},
            description="classes left out of training and scoring (LAS codes 0-255)",
        ),
    },
    doc_md=__doc__,
)
def pointflow_train():
    @task
    def train(params: dict | None = None) -> dict:
        from airflow.sdk import get_current_context

        from pipelines.dag_tasks import task_runtime
        from pipelines.training import train_and_tell

        context = get_current_context()
        run = f"{context['dag'].dag_id}:{context['run_id']}"
        return train_and_tell(task_runtime(), params["account_id"], params["sources"], params["ignore_classes"], run)

    train()


train_dag = pointflow_train()
