"""What the load scripts ask the demo bike shop: questions its documents answer."""

QUESTIONS = [
    "How long does shipping take?",
    "Can I return a bike I bought online?",
    "What are your opening hours on Saturday?",
    "Do you offer test rides?",
    "How do I track my order?",
    "Which payment methods do you accept?",
    "Do you repair e-bikes?",
    "How does the warranty work?",
    "Do you sell gift cards?",
    "What size frame do I need?",
]
