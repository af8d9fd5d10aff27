"""orders.account, executions.account, position_snapshots.account and account_snapshots.account:
the broker's account a row belongs to (IBKR DU… or U…)

Two IBKR accounts (the paper DU… account, then the live U… one, on the same trading database) are
the same broker "ibkr": the account tells their rows apart, the syncs' snapshots included (one
account's sync must not stand in for the other's: the orphan-stop timing and the "since the last
sync" window read them). Existing rows keep NULL: they stay with whichever IBKR account runs, as
before (`trading_db.of_broker`).

Revision ID: 0008_order_account
Revises: 0007_unknown_daily_pnl
Create Date: 2026-12-07 19:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0008_order_account'
down_revision = '0007_unknown_daily_pnl'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('account', sa.String(length=32), nullable=True))
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('account', sa.String(length=32), nullable=True))
    with op.batch_alter_table('position_snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('account', sa.String(length=32), nullable=True))
    with op.batch_alter_table('account_snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('account', sa.String(length=32), nullable=True))


def downgrade() -> None:
    # Without the column, the rows of two accounts of one broker read as one account's again (the
    # defect this revision fixed): with more than one, the downgrade stops and says what to do.
    mixed = op.get_bind().execute(sa.text(
        "SELECT broker, COUNT(DISTINCT account) FROM orders WHERE account IS NOT NULL GROUP BY broker "
        "HAVING COUNT(DISTINCT account) > 1")).all()
    if mixed:
        brokers = ", ".join(f"{broker} ({count} accounts)" for broker, count in mixed)
        raise RuntimeError(
            f"the orders of {brokers} name more than one account, which the schema before {revision} cannot "
            "tell apart (one account's sync would then ask about, and close, the other's working orders). Fix: "
            "keep a copy of the trading database, delete the rows of the account you no longer use (orders, "
            "their order_events, executions), then downgrade again")
    # The snapshots' account goes with the column: two accounts' snapshots then read as the broker's
    # again, as before this revision (a sync's orphan-stop timing may count the other account's
    # syncs); the check above is what keeps two accounts' working orders from being merged.
    with op.batch_alter_table('account_snapshots', schema=None) as batch_op:
        batch_op.drop_column('account')
    with op.batch_alter_table('position_snapshots', schema=None) as batch_op:
        batch_op.drop_column('account')
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.drop_column('account')
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_column('account')
