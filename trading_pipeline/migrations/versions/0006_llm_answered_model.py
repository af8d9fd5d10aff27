"""llm_calls.answered_model and llm_response_cache.answered_model: the model the server says answered

Revision ID: 0006_answered_model
Revises: 0005_backtest
Create Date: 2026-12-08 10:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006_answered_model'
down_revision = '0005_backtest'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('llm_calls', schema=None) as batch_op:
        batch_op.add_column(sa.Column('answered_model', sa.String(length=128), nullable=True))
    with op.batch_alter_table('llm_response_cache', schema=None) as batch_op:
        batch_op.add_column(sa.Column('answered_model', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('llm_response_cache', schema=None) as batch_op:
        batch_op.drop_column('answered_model')
    with op.batch_alter_table('llm_calls', schema=None) as batch_op:
        batch_op.drop_column('answered_model')
