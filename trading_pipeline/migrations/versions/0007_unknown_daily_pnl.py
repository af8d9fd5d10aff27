"""account_snapshots.daily_pnl nullable: NULL when the broker could not say today's P&L (never 0)

Revision ID: 0007_unknown_daily_pnl
Revises: 0006_answered_model
Create Date: 2026-12-07 17:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007_unknown_daily_pnl'
down_revision = '0006_answered_model'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('account_snapshots', schema=None) as batch_op:
        batch_op.alter_column('daily_pnl', existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    # A snapshot taken while the P&L was unknown has no number to go back to: it is left out.
    op.execute("DELETE FROM account_snapshots WHERE daily_pnl IS NULL")
    with op.batch_alter_table('account_snapshots', schema=None) as batch_op:
        batch_op.alter_column('daily_pnl', existing_type=sa.Float(), nullable=False)
