"""paper broker: commissions, market orders, live-since and status detail

Revision ID: 0003_paper
Revises: 0002
Create Date: 2026-12-06 16:37:47.854772

Existing paper orders get their `live_since` from what the broker knew before: an order without
a parent worked from its placement, a child from its parent's first fill (none yet: it waits).
"""
import sqlalchemy as sa
from alembic import op

revision = '0003_paper'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('commission', sa.Float(), server_default='0', nullable=False))

    with op.batch_alter_table('paper_fills', schema=None) as batch_op:
        batch_op.add_column(sa.Column('commission', sa.Float(), server_default='0', nullable=False))

    with op.batch_alter_table('paper_orders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('live_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('detail', sa.Text(), nullable=True))
        batch_op.alter_column('price', existing_type=sa.FLOAT(), nullable=True)

    op.execute("UPDATE paper_orders SET live_since = created_at WHERE parent_broker_order_id IS NULL")
    op.execute("UPDATE paper_orders SET live_since = (SELECT MIN(paper_fills.executed_at) FROM paper_fills "
               "WHERE paper_fills.broker_order_id = paper_orders.parent_broker_order_id) "
               "WHERE parent_broker_order_id IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('paper_orders', schema=None) as batch_op:
        batch_op.alter_column('price', existing_type=sa.FLOAT(), nullable=False)
        batch_op.drop_column('detail')
        batch_op.drop_column('live_since')

    with op.batch_alter_table('paper_fills', schema=None) as batch_op:
        batch_op.drop_column('commission')

    with op.batch_alter_table('executions', schema=None) as batch_op:
        batch_op.drop_column('commission')
