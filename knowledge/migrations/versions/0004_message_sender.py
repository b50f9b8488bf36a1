"""messages.sender_id: who sent each customer message (group chats have many senders)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00

A conversation is keyed by its chat, and its customer is whoever spoke first; in a Telegram group
every member's messages land in that one conversation. `sender_id` is the channel's id of the
person who sent a customer message (Telegram `from_user.id`), so `apprentice forget` can erase
one member by what they sent. NULL for replies and for messages stored before this revision
(those count as the conversation customer's own).
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sender_id', sa.String(length=128), nullable=True))
        batch_op.create_index(batch_op.f('ix_messages_sender_id'), ['sender_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_sender_id'))
        batch_op.drop_column('sender_id')
