"""exits: orders.price may be empty (market orders), orders.exit_decision_id (a stop turned into an exit)

Revision ID: 0004_exits
Revises: 0003_paper
Create Date: 2026-12-06 17:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_exits'
down_revision = '0003_paper'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.alter_column('price', existing_type=sa.Float(), nullable=True)
        batch_op.add_column(sa.Column('exit_decision_id', sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f('ix_orders_exit_decision_id'), ['exit_decision_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_orders_exit_decision_id'))
        batch_op.drop_column('exit_decision_id')
        batch_op.alter_column('price', existing_type=sa.Float(), nullable=False)
