"""messages.search_text: what a customer message was searched as, when that is not its own text

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 18:30:00

A follow-up ("do they expire?") is searched together with the question it follows, and courtesies
are left out of the search (bot/query.py). The nightly datasets (learning/datasets.py) add a later
customer's message that the correction memory answered to the lesson as a paraphrase, and an
approved answer as a lesson of its own: "do they expire?" on its own would teach the model the gift
cards' answer to any question about expiry. NULL where the message was searched as written, and for
messages stored before this revision.
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search_text', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('search_text')
