"""csat_asks: the one "Did this solve your problem?" question per conversation, and its answer

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 12:00:00

One row per conversation asked: inserted before the question is sent (the claim every replica
and restart respects), `answer` "yes"/"no" once the customer replies.
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('csat_asks',
    sa.Column('conversation_id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=True),
    sa.Column('asked_at', sa.DateTime(), nullable=False),
    sa.Column('answer', sa.String(length=8), nullable=True),
    sa.Column('answered_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('conversation_id')
    )
    with op.batch_alter_table('csat_asks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_csat_asks_asked_at'), ['asked_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('csat_asks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_csat_asks_asked_at'))
    op.drop_table('csat_asks')
