"""request log, erasure audit, exports, meta

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(200)),
        sa.Column("user_ref", sa.String(64)),
        sa.Column("model", sa.String(300)),
        sa.Column("route", sa.String(100)),
        sa.Column("status", sa.Integer),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("latency_ms", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("prompt", sa.Text),
        sa.Column("answer", sa.Text),
        sa.Column("log_mode", sa.String(16)),
    )
    op.create_index("ix_request_log_created_at", "request_log", ["created_at"])
    op.create_index("ix_request_log_user_ref", "request_log", ["user_ref"])
    op.create_table(
        "erasure_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200)),
        sa.Column("user_ref", sa.String(64)),
        sa.Column("counts", sa.JSON),
    )
    op.create_table(
        "log_exports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_ref", sa.String(64)),
        sa.Column("path", sa.Text),
    )
    op.create_index("ix_log_exports_user_ref", "log_exports", ["user_ref"])
    op.create_table("log_meta", sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text))


def downgrade() -> None:
    for t in ("log_meta", "log_exports", "erasure_audit", "request_log"):
        op.drop_table(t)
