"""The built-in contrast set of ``avec demo``: 36 pairs about the ocean vs everyday topics.

Each pair shares its sentence frame and differs only in the topic, so the mean difference of
last-token activations points at "the ocean / the sea" and little else.
"""

from __future__ import annotations

from avec.data.pairs import ContrastPair

_FRAMES = [
    ("I spent the whole afternoon thinking about", "the ocean waves crashing on the shore",
     "the paperwork piling up on my desk"),
    ("My favourite thing to write about is", "the deep blue sea and its coral reefs",
     "the history of office furniture"),
    ("Last weekend we finally went to", "the beach to swim in the salty sea",
     "the hardware store to buy some screws"),
    ("The documentary I watched was about", "whales and dolphins in the open ocean",
     "the invention of the spreadsheet"),
    ("She told me that her dream is to", "sail across the Atlantic Ocean on a small boat",
     "get promoted to regional sales manager"),
    ("The painting on the wall shows", "a stormy sea with tall waves and a lighthouse",
     "a bowl of apples on a wooden table"),
    ("When I close my eyes I can hear", "the waves of the sea rolling onto the sand",
     "the hum of the refrigerator in the kitchen"),
    ("The book on my nightstand is about", "sailors lost at sea in the Pacific Ocean",
     "accounting rules for small businesses"),
    ("Every summer my family travels to", "the seaside to watch the tide come in",
     "my aunt's apartment in the city centre"),
    ("The smell that reminds me of home is", "the salty ocean breeze near the harbour",
     "freshly printed paper in the copy room"),
    ("The topic of today's lecture is", "marine biology and life in the deep ocean",
     "tax law and quarterly filing deadlines"),
    ("Our new project will study", "ocean currents and rising sea levels",
     "traffic patterns on suburban roads"),
    ("He spent his childhood", "fishing from boats on the open sea",
     "playing video games in his bedroom"),
    ("The photo he sent me shows", "surfers riding huge ocean waves at sunset",
     "a parking lot full of grey cars"),
    ("I could talk for hours about", "seashells, tides and the creatures of the sea",
     "spreadsheets, invoices and office supplies"),
    ("The song on the radio was about", "a sailor longing for the endless sea",
     "a man waiting for the morning bus"),
    ("In my free time I like to", "dive among coral reefs in the tropical ocean",
     "organise the files on my computer"),
    ("The museum's new exhibit is about", "shipwrecks on the bottom of the ocean",
     "the history of the typewriter"),
    ("The children were excited to see", "the dolphins jumping out of the sea",
     "the new printer in the classroom"),
    ("The article explains how", "ocean tides are pulled by the moon",
     "mortgage interest rates are set"),
    ("Tonight's dinner will be", "fresh fish caught this morning in the sea",
     "leftover pasta from the fridge"),
    ("The view from the hotel window was", "the vast blue ocean stretching to the horizon",
     "a grey office building across the street"),
    ("My grandfather used to tell stories about", "his years as a sailor on the ocean",
     "his years as a clerk at the bank"),
    ("The scientists are worried about", "plastic pollution harming ocean wildlife",
     "delays in the delivery of lab equipment"),
    ("We sat quietly and watched", "the waves roll in from the sea",
     "the clock tick on the wall"),
    ("The main character of the novel is", "a fisherman battling storms at sea",
     "an accountant preparing annual reports"),
    ("What I miss most about the holiday is", "swimming in the warm turquoise sea",
     "the free breakfast at the hotel"),
    ("The podcast episode was all about", "sharks, octopuses and deep sea creatures",
     "productivity tips for office workers"),
    ("Our town is famous for", "its harbour, its beaches and the sea",
     "its parking garages and its bus station"),
    ("The poem describes", "moonlight shining on the quiet ocean",
     "a long queue at the post office"),
    ("For his birthday he wanted", "a trip to the coast to see the ocean",
     "a new keyboard for his computer"),
    ("The old map showed", "sea routes across the ocean to distant islands",
     "the streets of the business district"),
    ("I woke up early to watch", "the sunrise over the sea from the beach",
     "the news about the stock market"),
    ("The research vessel set out to explore", "the deepest trenches of the ocean floor",
     "new markets for the company's software"),
    ("The teacher asked us to draw", "a sailboat on the waves of the sea",
     "a chair standing in an empty room"),
    ("Nothing calms me down like", "the sound of the ocean at night",
     "a well organised filing cabinet"),
]

DEMO_PAIRS: list[ContrastPair] = [
    ContrastPair(positive=f"{frame} {pos}.", negative=f"{frame} {neg}.")
    for frame, pos, neg in _FRAMES
]

DEMO_PROMPTS: list[str] = [
    "Tell me about your weekend plans.",
    "What should I cook for dinner tonight?",
    "Write a short story about a cat.",
    "Give me some advice for a job interview.",
]

DEMO_TARGET_WORDS: tuple[str, ...] = (
    "ocean", "sea", "wave", "beach", "shore", "tide", "marine", "coral", "sail", "boat",
    "fish", "whale", "dolphin", "coast", "surf", "island", "harbor", "harbour", "underwater",
    "seaside", "water", "swim",
)

NEUTRAL_PROMPTS: list[str] = [
    "Tell me about your weekend plans.",
    "What should I cook for dinner tonight?",
    "Write a short story about a cat.",
    "Give me some advice for a job interview.",
    "How do I learn to play the guitar?",
    "Describe your ideal house.",
    "What is a good way to stay productive?",
    "Explain how a bicycle works.",
]

# Everyday prompts whose greedy completions a concept comparison scores (disjoint from the KL
# prompts above, so the side effect is not measured on the prompts being steered).
CONCEPT_PROMPTS: list[str] = [
    "What did you do yesterday?",
    "Can you recommend a good book?",
    "How do I fix a leaky faucet?",
    "Tell me about the history of Rome.",
    "What's the best way to learn a language?",
    "Describe a day at the office.",
    "How does photosynthesis work?",
    "What are some fun hobbies?",
]

# Everyday prompts ``avec tune`` scores by default: the concept prompts and 8 more, disjoint
# from the neutral KL prompts, so a seeded split leaves held-out prompts to check the choice on.
TUNE_PROMPTS: list[str] = CONCEPT_PROMPTS + [
    "What should I know before adopting a dog?",
    "Give me tips for a long train journey.",
    "How can I sleep better at night?",
    "What is a good gift for a friend?",
    "Plan a relaxing Sunday for me.",
    "How do I start running?",
    "What makes a good presentation?",
    "Tell me something interesting about trees.",
]
