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
    # A snapshot taken while the P&L was unknown has no number the old schema could hold (0 would
    # say "no loss today"): rather than drop the account's history quietly, the downgrade stops and
    # says what to do with those rows.
    unknown = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM account_snapshots WHERE daily_pnl IS NULL")).scalar()
    if unknown:
        raise RuntimeError(
            f"{unknown} account snapshot(s) have an unknown daily P&L (daily_pnl NULL), which the schema before "
            f"{revision} cannot hold. Fix: keep them elsewhere if you need them (they hold equity, cash and "
            "exposure), delete them with DELETE FROM account_snapshots WHERE daily_pnl IS NULL, then downgrade again")
    with op.batch_alter_table('account_snapshots', schema=None) as batch_op:
        batch_op.alter_column('daily_pnl', existing_type=sa.Float(), nullable=False)
