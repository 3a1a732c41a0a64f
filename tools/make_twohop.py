#!/usr/bin/env python3
"""Build patchlab/data/twohop.jsonl: a small two-hop factual-recall dataset.

Standalone and deterministic (stdlib only, no randomness).  Every item is
composed from the hand-written fact tables below and a handful of cloze
templates per kind.  Each item asks a two-hop question

    subject --hop1--> bridge --hop2--> answer

and carries the single hops (``hop1`` / ``hop2``), the composed query with
the bridge left implicit (``composed``) and a few ``paraphrases`` of it.  All
prompts are clozes that end right before the answer (no trailing space or
punctuation).

Usage:  python tools/make_twohop.py [OUTPUT_PATH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "patchlab" / "data" / "twohop.jsonl"

# ---------------------------------------------------------------------------
# Fact tables
# ---------------------------------------------------------------------------

EURO = ("euro", ("Euro", "EUR"))


def country(name, capital=None, currency=None, language=None, continent=None, *, the=False, aliases=()):
    """One country record.  capital/currency/language may be a plain string or a
    (canonical, (aliases...)) pair; None means "ambiguous, do not ask"."""

    def norm(v):
        if v is None:
            return None
        if isinstance(v, str):
            return (v, ())
        return (v[0], tuple(v[1]))

    return {
        "name": name,
        "article": "the" if the else "",
        "aliases": tuple(aliases),
        "capital": norm(capital),
        "currency": norm(currency),
        "language": norm(language),
        "continent": norm(continent),
    }


COUNTRIES = {
    c["name"]: c
    for c in [
        country("France", "Paris", EURO, "French", "Europe"),
        country("Germany", "Berlin", EURO, "German", "Europe"),
        country("Italy", "Rome", EURO, "Italian", "Europe"),
        country("Spain", "Madrid", EURO, "Spanish", "Europe"),
        country("Portugal", "Lisbon", EURO, "Portuguese", "Europe"),
        country("Greece", "Athens", EURO, "Greek", "Europe"),
        country("Austria", "Vienna", EURO, "German", "Europe"),
        country("Netherlands", "Amsterdam", EURO, "Dutch", "Europe", the=True, aliases=("the Netherlands", "Holland")),
        country("Ireland", "Dublin", EURO, None, "Europe", aliases=("Republic of Ireland",)),
        country("Finland", "Helsinki", EURO, "Finnish", "Europe"),
        country(
            "United Kingdom",
            "London",
            ("pound sterling", ("pound", "British pound", "sterling", "GBP")),
            "English",
            "Europe",
            the=True,
            aliases=("the United Kingdom", "UK", "the UK", "U.K.", "Britain", "Great Britain", "England"),
        ),
        # Used where the natural answer to "born in the country of" is England.
        country(
            "England",
            "London",
            ("pound sterling", ("pound", "British pound", "sterling", "GBP")),
            "English",
            "Europe",
            aliases=("United Kingdom", "the United Kingdom", "UK", "the UK", "Britain", "Great Britain"),
        ),
        country(
            "Czech Republic",
            "Prague",
            ("koruna", ("Czech koruna", "crown", "Czech crown", "CZK")),
            "Czech",
            "Europe",
            the=True,
            aliases=("the Czech Republic", "Czechia"),
        ),
        country("Poland", "Warsaw", ("zloty", ("złoty", "Polish zloty", "Polish złoty", "PLN")), "Polish", "Europe"),
        country("Hungary", "Budapest", ("forint", ("Hungarian forint",)), "Hungarian", "Europe"),
        country("Romania", "Bucharest", ("leu", ("Romanian leu",)), "Romanian", "Europe"),
        country("Denmark", "Copenhagen", ("krone", ("Danish krone", "crown", "Danish crown")), "Danish", "Europe"),
        country("Norway", "Oslo", ("krone", ("Norwegian krone", "crown", "Norwegian crown")), "Norwegian", "Europe"),
        country("Sweden", "Stockholm", ("krona", ("Swedish krona", "crown", "Swedish crown")), "Swedish", "Europe"),
        country(
            "Iceland",
            ("Reykjavik", ("Reykjavík",)),
            ("króna", ("krona", "Icelandic króna", "Icelandic krona")),
            "Icelandic",
            "Europe",
        ),
        country("Serbia", "Belgrade", ("dinar", ("Serbian dinar",)), "Serbian", "Europe"),
        country(
            "Russia",
            "Moscow",
            ("ruble", ("rouble", "Russian ruble", "Russian rouble")),
            "Russian",
            None,
            aliases=("Russian Federation",),
        ),
        country("Turkey", "Ankara", ("lira", ("Turkish lira",)), "Turkish", None, aliases=("Türkiye",)),
        country(
            "United States",
            ("Washington", ("Washington, D.C.", "Washington D.C.", "Washington DC")),
            ("US dollar", ("dollar", "U.S. dollar", "United States dollar", "American dollar", "USD")),
            "English",
            "North America",
            the=True,
            aliases=(
                "the United States",
                "USA",
                "the USA",
                "US",
                "the US",
                "U.S.",
                "America",
                "United States of America",
                "the United States of America",
            ),
        ),
        country("Canada", "Ottawa", ("Canadian dollar", ("dollar",)), None, "North America"),
        country("Mexico", None, ("peso", ("Mexican peso",)), "Spanish", "North America"),
        country("Jamaica", "Kingston", ("Jamaican dollar", ("dollar",)), "English", "North America"),
        country("Cuba", "Havana", None, "Spanish", "North America"),
        country("Brazil", ("Brasília", ("Brasilia",)), ("real", ("Brazilian real",)), "Portuguese", "South America"),
        country("Argentina", "Buenos Aires", ("peso", ("Argentine peso",)), "Spanish", "South America"),
        country("Peru", "Lima", ("sol", ("Peruvian sol", "nuevo sol")), "Spanish", "South America"),
        country("Colombia", ("Bogotá", ("Bogota",)), ("peso", ("Colombian peso",)), "Spanish", "South America"),
        country("Chile", ("Santiago", ("Santiago de Chile",)), ("peso", ("Chilean peso",)), "Spanish", "South America"),
        country("Ecuador", "Quito", None, "Spanish", "South America"),
        country("Japan", "Tokyo", ("yen", ("Japanese yen",)), "Japanese", "Asia"),
        country(
            "China",
            ("Beijing", ("Peking",)),
            ("yuan", ("renminbi", "Chinese yuan", "RMB")),
            ("Chinese", ("Mandarin", "Mandarin Chinese", "Standard Chinese")),
            "Asia",
            aliases=("People's Republic of China", "PRC"),
        ),
        country(
            "South Korea",
            "Seoul",
            ("won", ("South Korean won", "Korean won")),
            "Korean",
            "Asia",
            aliases=("Korea", "Republic of Korea"),
        ),
        country("India", ("New Delhi", ("Delhi",)), ("rupee", ("Indian rupee",)), None, "Asia"),
        country("Pakistan", "Islamabad", ("rupee", ("Pakistani rupee",)), None, "Asia"),
        country("Vietnam", "Hanoi", ("dong", ("đồng", "Vietnamese dong")), "Vietnamese", "Asia", aliases=("Viet Nam",)),
        country("Thailand", "Bangkok", ("baht", ("Thai baht",)), "Thai", "Asia"),
        country("Cambodia", ("Phnom Penh", ()), ("riel", ("Cambodian riel",)), "Khmer", "Asia"),
        country("Indonesia", None, ("rupiah", ("Indonesian rupiah",)), ("Indonesian", ("Bahasa Indonesia",)), "Asia"),
        country(
            "Philippines",
            "Manila",
            ("peso", ("Philippine peso",)),
            None,
            "Asia",
            the=True,
            aliases=("the Philippines",),
        ),
        country("Mongolia", ("Ulaanbaatar", ("Ulan Bator",)), None, None, "Asia"),
        country("Iran", ("Tehran", ("Teheran",)), None, ("Persian", ("Farsi",)), "Asia", aliases=("Persia",)),
        country("Jordan", "Amman", ("dinar", ("Jordanian dinar",)), "Arabic", "Asia"),
        country(
            "United Arab Emirates",
            "Abu Dhabi",
            ("dirham", ("UAE dirham", "Emirati dirham")),
            "Arabic",
            "Asia",
            the=True,
            aliases=("the United Arab Emirates", "UAE", "the UAE", "Emirates"),
        ),
        country("Egypt", "Cairo", ("Egyptian pound", ("pound",)), "Arabic", "Africa"),
        country("Morocco", "Rabat", ("dirham", ("Moroccan dirham",)), "Arabic", "Africa"),
        country("Nigeria", "Abuja", ("naira", ("Nigerian naira",)), None, "Africa"),
        country("Ghana", "Accra", ("cedi", ("Ghanaian cedi",)), None, "Africa"),
        country("Ethiopia", "Addis Ababa", ("birr", ("Ethiopian birr",)), "Amharic", "Africa"),
        country("Kenya", "Nairobi", ("shilling", ("Kenyan shilling",)), None, "Africa"),
        country("Tanzania", None, None, None, "Africa"),
        country("Mali", "Bamako", None, None, "Africa"),
        country("Australia", "Canberra", ("Australian dollar", ("dollar",)), "English", None),
    ]
}

# Landmarks: (name, article, country).  Used for capital, currency and language
# so the same subject appears with several different second hops.
LANDMARKS = [
    ("Eiffel Tower", "the", "France"),
    ("Louvre", "the", "France"),
    ("Palace of Versailles", "the", "France"),
    ("Mont Saint-Michel", "", "France"),
    ("Arc de Triomphe", "the", "France"),
    ("Colosseum", "the", "Italy"),
    ("Leaning Tower of Pisa", "the", "Italy"),
    ("Trevi Fountain", "the", "Italy"),
    ("St. Mark's Basilica", "", "Italy"),
    ("Sagrada Família", "the", "Spain"),
    ("Alhambra", "the", "Spain"),
    ("Park Güell", "", "Spain"),
    ("Brandenburg Gate", "the", "Germany"),
    ("Neuschwanstein Castle", "", "Germany"),
    ("Cologne Cathedral", "", "Germany"),
    ("Big Ben", "", "United Kingdom"),
    ("Stonehenge", "", "United Kingdom"),
    ("Buckingham Palace", "", "United Kingdom"),
    ("Westminster Abbey", "", "United Kingdom"),
    ("Statue of Liberty", "the", "United States"),
    ("Golden Gate Bridge", "the", "United States"),
    ("Grand Canyon", "the", "United States"),
    ("Mount Rushmore", "", "United States"),
    ("Empire State Building", "the", "United States"),
    ("Hollywood Sign", "the", "United States"),
    ("Mount Fuji", "", "Japan"),
    ("Himeji Castle", "", "Japan"),
    ("Fushimi Inari Shrine", "the", "Japan"),
    ("Great Wall", "the", "China"),
    ("Forbidden City", "the", "China"),
    ("Terracotta Army", "the", "China"),
    ("Taj Mahal", "the", "India"),
    ("Great Pyramid of Giza", "the", "Egypt"),
    ("Great Sphinx of Giza", "the", "Egypt"),
    ("Abu Simbel", "", "Egypt"),
    ("Acropolis", "the", "Greece"),
    ("Parthenon", "the", "Greece"),
    ("Red Square", "", "Russia"),
    ("Saint Basil's Cathedral", "", "Russia"),
    ("Kremlin", "the", "Russia"),
    ("Christ the Redeemer", "", "Brazil"),
    ("Sugarloaf Mountain", "", "Brazil"),
    ("Machu Picchu", "", "Peru"),
    ("Chichen Itza", "", "Mexico"),
    ("Teotihuacan", "", "Mexico"),
    ("Sydney Opera House", "the", "Australia"),
    ("Uluru", "", "Australia"),
    ("Great Barrier Reef", "the", "Australia"),
    ("CN Tower", "the", "Canada"),
    ("Angkor Wat", "", "Cambodia"),
    ("Petra", "", "Jordan"),
    ("Burj Khalifa", "the", "United Arab Emirates"),
    ("Hagia Sophia", "", "Turkey"),
    ("Blue Mosque", "the", "Turkey"),
    ("Charles Bridge", "the", "Czech Republic"),
    ("Tivoli Gardens", "", "Denmark"),
    ("Kronborg Castle", "", "Denmark"),
    ("Rijksmuseum", "the", "Netherlands"),
    ("Anne Frank House", "the", "Netherlands"),
    ("Keukenhof", "", "Netherlands"),
    ("Belém Tower", "", "Portugal"),
    ("Schönbrunn Palace", "", "Austria"),
    ("Wawel Castle", "", "Poland"),
    ("Gyeongbokgung Palace", "", "South Korea"),
    ("Ha Long Bay", "", "Vietnam"),
    ("Blue Lagoon", "the", "Iceland"),
    ("Geirangerfjord", "the", "Norway"),
    ("Vasa Museum", "the", "Sweden"),
    ("Blarney Castle", "", "Ireland"),
    ("Bran Castle", "", "Romania"),
    ("Borobudur", "", "Indonesia"),
    ("Wat Arun", "", "Thailand"),
    ("Perito Moreno Glacier", "the", "Argentina"),
    ("Hassan II Mosque", "the", "Morocco"),
]

# Famous people with one clear country of birth: (name, country).
PEOPLE = [
    ("Albert Einstein", "Germany"),
    ("Johann Sebastian Bach", "Germany"),
    ("Ludwig van Beethoven", "Germany"),
    ("Karl Marx", "Germany"),
    ("Martin Luther", "Germany"),
    ("Wolfgang Amadeus Mozart", "Austria"),
    ("Franz Schubert", "Austria"),
    ("Arnold Schwarzenegger", "Austria"),
    ("Pablo Picasso", "Spain"),
    ("Miguel de Cervantes", "Spain"),
    ("Salvador Dalí", "Spain"),
    ("Rafael Nadal", "Spain"),
    ("Leonardo da Vinci", "Italy"),
    ("Galileo Galilei", "Italy"),
    ("Dante Alighieri", "Italy"),
    ("Christopher Columbus", "Italy"),
    ("William Shakespeare", "England"),
    ("Isaac Newton", "England"),
    ("Charles Darwin", "England"),
    ("Winston Churchill", "England"),
    ("Charles Dickens", "England"),
    ("Victor Hugo", "France"),
    ("Claude Monet", "France"),
    ("Joan of Arc", "France"),
    ("Louis Pasteur", "France"),
    ("Zinedine Zidane", "France"),
    ("Marie Curie", "Poland"),
    ("Frédéric Chopin", "Poland"),
    ("Nicolaus Copernicus", "Poland"),
    ("Leo Tolstoy", "Russia"),
    ("Pyotr Ilyich Tchaikovsky", "Russia"),
    ("Fyodor Dostoevsky", "Russia"),
    ("Alexander Pushkin", "Russia"),
    ("Aristotle", "Greece"),
    ("Socrates", "Greece"),
    ("Vincent van Gogh", "Netherlands"),
    ("Rembrandt", "Netherlands"),
    ("Hans Christian Andersen", "Denmark"),
    ("Edvard Munch", "Norway"),
    ("Henrik Ibsen", "Norway"),
    ("Roald Amundsen", "Norway"),
    ("Alfred Nobel", "Sweden"),
    ("Greta Garbo", "Sweden"),
    ("Jean Sibelius", "Finland"),
    ("Björk", "Iceland"),
    ("Oscar Wilde", "Ireland"),
    ("James Joyce", "Ireland"),
    ("Cristiano Ronaldo", "Portugal"),
    ("Vasco da Gama", "Portugal"),
    ("Novak Djokovic", "Serbia"),
    ("Abraham Lincoln", "United States"),
    ("Elvis Presley", "United States"),
    ("Thomas Edison", "United States"),
    ("Martin Luther King Jr.", "United States"),
    ("Justin Bieber", "Canada"),
    ("Wayne Gretzky", "Canada"),
    ("Céline Dion", "Canada"),
    ("Bob Marley", "Jamaica"),
    ("Usain Bolt", "Jamaica"),
    ("Fidel Castro", "Cuba"),
    ("Pelé", "Brazil"),
    ("Ayrton Senna", "Brazil"),
    ("Lionel Messi", "Argentina"),
    ("Diego Maradona", "Argentina"),
    ("Gabriel García Márquez", "Colombia"),
    ("Shakira", "Colombia"),
    ("Akira Kurosawa", "Japan"),
    ("Hayao Miyazaki", "Japan"),
    ("Confucius", "China"),
    ("Mao Zedong", "China"),
    ("Mahatma Gandhi", "India"),
    ("Rabindranath Tagore", "India"),
    ("Sachin Tendulkar", "India"),
    ("Malala Yousafzai", "Pakistan"),
    ("Ban Ki-moon", "South Korea"),
    ("Genghis Khan", "Mongolia"),
    ("Omar Khayyam", "Iran"),
    ("Cleopatra", "Egypt"),
    ("Mohamed Salah", "Egypt"),
    ("Haile Selassie", "Ethiopia"),
    ("Chinua Achebe", "Nigeria"),
    ("Kofi Annan", "Ghana"),
    ("Hugh Jackman", "Australia"),
    ("Steve Irwin", "Australia"),
]

# Companies and the country of their headquarters: (name, country).
COMPANIES = [
    ("Toyota", "Japan"),
    ("Sony", "Japan"),
    ("Nintendo", "Japan"),
    ("Honda", "Japan"),
    ("Panasonic", "Japan"),
    ("Canon", "Japan"),
    ("Samsung", "South Korea"),
    ("Hyundai", "South Korea"),
    ("Kia", "South Korea"),
    ("LG", "South Korea"),
    ("Volkswagen", "Germany"),
    ("BMW", "Germany"),
    ("Siemens", "Germany"),
    ("Adidas", "Germany"),
    ("Mercedes-Benz", "Germany"),
    ("Porsche", "Germany"),
    ("Bosch", "Germany"),
    ("Puma", "Germany"),
    ("Nokia", "Finland"),
    ("Ericsson", "Sweden"),
    ("Volvo", "Sweden"),
    ("H&M", "Sweden"),
    ("Electrolux", "Sweden"),
    ("Lego", "Denmark"),
    ("Carlsberg", "Denmark"),
    ("Maersk", "Denmark"),
    ("Philips", "Netherlands"),
    ("Heineken", "Netherlands"),
    ("Ferrari", "Italy"),
    ("Lamborghini", "Italy"),
    ("Gucci", "Italy"),
    ("Prada", "Italy"),
    ("Pirelli", "Italy"),
    ("Barilla", "Italy"),
    ("Renault", "France"),
    ("L'Oréal", "France"),
    ("Michelin", "France"),
    ("Louis Vuitton", "France"),
    ("Danone", "France"),
    ("Zara", "Spain"),
    ("Telefónica", "Spain"),
    ("Santander", "Spain"),
    ("Apple", "United States"),
    ("Microsoft", "United States"),
    ("Google", "United States"),
    ("Amazon", "United States"),
    ("Coca-Cola", "United States"),
    ("Boeing", "United States"),
    ("Ford", "United States"),
    ("Walmart", "United States"),
    ("Nike", "United States"),
    ("Tata", "India"),
    ("Infosys", "India"),
    ("Alibaba", "China"),
    ("Huawei", "China"),
    ("Tencent", "China"),
    ("BYD", "China"),
    ("Xiaomi", "China"),
    ("Petrobras", "Brazil"),
    ("Embraer", "Brazil"),
    ("Gazprom", "Russia"),
    ("Aeroflot", "Russia"),
    ("Tesco", "United Kingdom"),
    ("BP", "United Kingdom"),
    ("Rolls-Royce", "United Kingdom"),
    ("HSBC", "United Kingdom"),
    ("Unilever", "United Kingdom"),
    ("Burberry", "United Kingdom"),
    ("Škoda", "Czech Republic"),
    ("Qantas", "Australia"),
    ("Shopify", "Canada"),
    ("BlackBerry", "Canada"),
    ("Ryanair", "Ireland"),
    ("Red Bull", "Austria"),
    ("CD Projekt", "Poland"),
    ("Equinor", "Norway"),
]

# Cities (mostly not capitals) and their country: (name, country).
CITIES = [
    ("Barcelona", "Spain"),
    ("Seville", "Spain"),
    ("Munich", "Germany"),
    ("Hamburg", "Germany"),
    ("Frankfurt", "Germany"),
    ("Milan", "Italy"),
    ("Venice", "Italy"),
    ("Florence", "Italy"),
    ("Naples", "Italy"),
    ("Lyon", "France"),
    ("Marseille", "France"),
    ("Manchester", "United Kingdom"),
    ("Liverpool", "United Kingdom"),
    ("Rotterdam", "Netherlands"),
    ("Porto", "Portugal"),
    ("Kraków", "Poland"),
    ("Salzburg", "Austria"),
    ("Gothenburg", "Sweden"),
    ("Bergen", "Norway"),
    ("Osaka", "Japan"),
    ("Kyoto", "Japan"),
    ("Shanghai", "China"),
    ("Shenzhen", "China"),
    ("Mumbai", "India"),
    ("Kolkata", "India"),
    ("Bangalore", "India"),
    ("Busan", "South Korea"),
    ("Ho Chi Minh City", "Vietnam"),
    ("Chiang Mai", "Thailand"),
    ("Karachi", "Pakistan"),
    ("Lahore", "Pakistan"),
    ("Dubai", "United Arab Emirates"),
    ("Lagos", "Nigeria"),
    ("Casablanca", "Morocco"),
    ("Marrakesh", "Morocco"),
    ("Alexandria", "Egypt"),
    ("Luxor", "Egypt"),
    ("Mombasa", "Kenya"),
    ("Timbuktu", "Mali"),
    ("Kumasi", "Ghana"),
    ("Dar es Salaam", "Tanzania"),
    ("Chicago", "United States"),
    ("Los Angeles", "United States"),
    ("New York City", "United States"),
    ("Houston", "United States"),
    ("Miami", "United States"),
    ("Toronto", "Canada"),
    ("Vancouver", "Canada"),
    ("Montreal", "Canada"),
    ("Guadalajara", "Mexico"),
    ("Cancún", "Mexico"),
    ("Rio de Janeiro", "Brazil"),
    ("São Paulo", "Brazil"),
    ("Cusco", "Peru"),
    ("Medellín", "Colombia"),
    ("Valparaíso", "Chile"),
    ("Guayaquil", "Ecuador"),
    ("Mendoza", "Argentina"),
]

# Dishes and their country of origin: (name as written mid-sentence, country).
DISHES = [
    ("sushi", "Japan"),
    ("sashimi", "Japan"),
    ("miso soup", "Japan"),
    ("pizza", "Italy"),
    ("risotto", "Italy"),
    ("lasagna", "Italy"),
    ("tiramisu", "Italy"),
    ("carbonara", "Italy"),
    ("paella", "Spain"),
    ("gazpacho", "Spain"),
    ("ratatouille", "France"),
    ("bouillabaisse", "France"),
    ("coq au vin", "France"),
    ("goulash", "Hungary"),
    ("tom yum", "Thailand"),
    ("massaman curry", "Thailand"),
    ("pho", "Vietnam"),
    ("banh mi", "Vietnam"),
    ("kung pao chicken", "China"),
    ("mapo tofu", "China"),
    ("dim sum", "China"),
    ("moussaka", "Greece"),
    ("souvlaki", "Greece"),
    ("tagine", "Morocco"),
    ("feijoada", "Brazil"),
    ("ceviche", "Peru"),
    ("Sachertorte", "Austria"),
    ("bratwurst", "Germany"),
    ("sauerbraten", "Germany"),
    ("fish and chips", "United Kingdom"),
    ("Yorkshire pudding", "United Kingdom"),
    ("butter chicken", "India"),
    ("tandoori chicken", "India"),
    ("masala dosa", "India"),
    ("poutine", "Canada"),
    ("kimchi", "South Korea"),
    ("bibimbap", "South Korea"),
    ("bulgogi", "South Korea"),
    ("beef stroganoff", "Russia"),
    ("smørrebrød", "Denmark"),
    ("stroopwafel", "Netherlands"),
    ("pastel de nata", "Portugal"),
    ("jerk chicken", "Jamaica"),
    ("adobo", "Philippines"),
    ("clam chowder", "United States"),
]

# Creators: name -> (country of birth, alternative names).
CREATORS = {
    "William Shakespeare": ("England", ("Shakespeare",)),
    "Leo Tolstoy": ("Russia", ("Tolstoy", "Lev Tolstoy")),
    "Fyodor Dostoevsky": ("Russia", ("Dostoevsky", "Dostoyevsky")),
    "Miguel de Cervantes": ("Spain", ("Cervantes",)),
    "Dante Alighieri": ("Italy", ("Dante",)),
    "Johann Wolfgang von Goethe": ("Germany", ("Goethe",)),
    "Victor Hugo": ("France", ("Hugo",)),
    "Jane Austen": ("England", ("Austen",)),
    "Charles Dickens": ("England", ("Dickens",)),
    "Mark Twain": ("United States", ("Twain", "Samuel Clemens")),
    "Gabriel García Márquez": ("Colombia", ("García Márquez", "Gabriel Garcia Marquez")),
    "Ernest Hemingway": ("United States", ("Hemingway",)),
    "F. Scott Fitzgerald": ("United States", ("Fitzgerald", "Scott Fitzgerald")),
    "J. K. Rowling": ("England", ("J.K. Rowling", "Rowling")),
    "James Joyce": ("Ireland", ("Joyce",)),
    "Gustave Flaubert": ("France", ("Flaubert",)),
    "Antoine de Saint-Exupéry": ("France", ("Saint-Exupéry", "Saint-Exupery")),
    "Carlo Collodi": ("Italy", ("Collodi",)),
    "Umberto Eco": ("Italy", ("Eco",)),
    "Haruki Murakami": ("Japan", ("Murakami",)),
    "Mary Shelley": ("England", ("Shelley",)),
    "Bram Stoker": ("Ireland", ("Stoker",)),
    "Oscar Wilde": ("Ireland", ("Wilde",)),
    "Herman Melville": ("United States", ("Melville",)),
    "Alexandre Dumas": ("France", ("Dumas",)),
    "Jules Verne": ("France", ("Verne",)),
    "Hans Christian Andersen": ("Denmark", ("Andersen",)),
    "Astrid Lindgren": ("Sweden", ("Lindgren",)),
    "Paulo Coelho": ("Brazil", ("Coelho",)),
    "Chinua Achebe": ("Nigeria", ("Achebe",)),
    "Lewis Carroll": ("England", ("Carroll",)),
    "Charles Darwin": ("England", ("Darwin",)),
    "Henrik Ibsen": ("Norway", ("Ibsen",)),
    "Leonardo da Vinci": ("Italy", ("Leonardo", "da Vinci")),
    "Vincent van Gogh": ("Netherlands", ("van Gogh", "Van Gogh")),
    "Pablo Picasso": ("Spain", ("Picasso",)),
    "Edvard Munch": ("Norway", ("Munch",)),
    "Salvador Dalí": ("Spain", ("Dalí", "Salvador Dali", "Dali")),
    "Johannes Vermeer": ("Netherlands", ("Vermeer",)),
    "Rembrandt": ("Netherlands", ("Rembrandt van Rijn",)),
    "Sandro Botticelli": ("Italy", ("Botticelli",)),
    "Claude Monet": ("France", ("Monet",)),
    "Katsushika Hokusai": ("Japan", ("Hokusai",)),
    "Auguste Rodin": ("France", ("Rodin",)),
    "Wolfgang Amadeus Mozart": ("Austria", ("Mozart",)),
    "Antonio Vivaldi": ("Italy", ("Vivaldi",)),
    "Pyotr Ilyich Tchaikovsky": ("Russia", ("Tchaikovsky",)),
    "Ludwig van Beethoven": ("Germany", ("Beethoven",)),
    "Georges Bizet": ("France", ("Bizet",)),
    "Giuseppe Verdi": ("Italy", ("Verdi",)),
    "Maurice Ravel": ("France", ("Ravel",)),
    "Johann Strauss II": ("Austria", ("Johann Strauss", "Strauss")),
    "Edvard Grieg": ("Norway", ("Grieg",)),
    "Gustav Holst": ("England", ("Holst",)),
}

# Works: (title, role, creator).  role selects the template family.
WORKS = [
    ("Hamlet", "play", "William Shakespeare"),
    ("War and Peace", "book", "Leo Tolstoy"),
    ("Crime and Punishment", "book", "Fyodor Dostoevsky"),
    ("Don Quixote", "book", "Miguel de Cervantes"),
    ("The Divine Comedy", "book", "Dante Alighieri"),
    ("Faust", "play", "Johann Wolfgang von Goethe"),
    ("Les Misérables", "book", "Victor Hugo"),
    ("Pride and Prejudice", "book", "Jane Austen"),
    ("Oliver Twist", "book", "Charles Dickens"),
    ("The Adventures of Tom Sawyer", "book", "Mark Twain"),
    ("One Hundred Years of Solitude", "book", "Gabriel García Márquez"),
    ("The Old Man and the Sea", "book", "Ernest Hemingway"),
    ("The Great Gatsby", "book", "F. Scott Fitzgerald"),
    ("Harry Potter and the Philosopher's Stone", "book", "J. K. Rowling"),
    ("Ulysses", "book", "James Joyce"),
    ("Madame Bovary", "book", "Gustave Flaubert"),
    ("The Little Prince", "book", "Antoine de Saint-Exupéry"),
    ("The Adventures of Pinocchio", "book", "Carlo Collodi"),
    ("The Name of the Rose", "book", "Umberto Eco"),
    ("Norwegian Wood", "book", "Haruki Murakami"),
    ("Frankenstein", "book", "Mary Shelley"),
    ("Dracula", "book", "Bram Stoker"),
    ("The Picture of Dorian Gray", "book", "Oscar Wilde"),
    ("Moby-Dick", "book", "Herman Melville"),
    ("The Three Musketeers", "book", "Alexandre Dumas"),
    ("Twenty Thousand Leagues Under the Seas", "book", "Jules Verne"),
    ("The Ugly Duckling", "book", "Hans Christian Andersen"),
    ("Pippi Longstocking", "book", "Astrid Lindgren"),
    ("The Alchemist", "book", "Paulo Coelho"),
    ("Things Fall Apart", "book", "Chinua Achebe"),
    ("Alice's Adventures in Wonderland", "book", "Lewis Carroll"),
    ("On the Origin of Species", "book", "Charles Darwin"),
    ("A Doll's House", "play", "Henrik Ibsen"),
    ("Romeo and Juliet", "play", "William Shakespeare"),
    ("the Mona Lisa", "painting", "Leonardo da Vinci"),
    ("The Starry Night", "painting", "Vincent van Gogh"),
    ("Guernica", "painting", "Pablo Picasso"),
    ("The Scream", "painting", "Edvard Munch"),
    ("The Persistence of Memory", "painting", "Salvador Dalí"),
    ("Girl with a Pearl Earring", "painting", "Johannes Vermeer"),
    ("The Night Watch", "painting", "Rembrandt"),
    ("The Birth of Venus", "painting", "Sandro Botticelli"),
    ("Water Lilies", "painting", "Claude Monet"),
    ("The Great Wave off Kanagawa", "painting", "Katsushika Hokusai"),
    ("The Thinker", "sculpture", "Auguste Rodin"),
    ("The Magic Flute", "music", "Wolfgang Amadeus Mozart"),
    ("The Four Seasons", "music", "Antonio Vivaldi"),
    ("Swan Lake", "music", "Pyotr Ilyich Tchaikovsky"),
    ("The Nutcracker", "music", "Pyotr Ilyich Tchaikovsky"),
    ("the Moonlight Sonata", "music", "Ludwig van Beethoven"),
    ("Carmen", "music", "Georges Bizet"),
    ("Aida", "music", "Giuseppe Verdi"),
    ("Boléro", "music", "Maurice Ravel"),
    ("The Blue Danube", "music", "Johann Strauss II"),
    ("In the Hall of the Mountain King", "music", "Edvard Grieg"),
    ("The Planets", "music", "Gustav Holst"),
]

# ---------------------------------------------------------------------------
# Templates.  Placeholders: {s}/{S} subject (lower/sentence-initial article),
# {s_poss}/{S_poss} possessive subject, {b}/{B} bridge, {B_poss} possessive
# bridge.  "hop1", "hop2" and "composed" rotate through their variants;
# paraphrases are drawn from the other composed variants plus "para".
# ---------------------------------------------------------------------------

LANDMARK_HOP1 = [
    "{S} is located in the country of",
    "{S} can be found in the country of",
    "The country where {s} is located is",
]
CAPITAL_HOP2 = [
    "The capital of {b} is",
    "The capital city of {b} is",
    "{B} has its capital in the city of",
]
CURRENCY_HOP2 = [
    "The currency of {b} is the",
    "The official currency of {b} is the",
    "In {b}, people pay with the",
]
LANGUAGE_HOP2 = [
    "The main language spoken in {b} is",
    "In {b}, most people speak",
    "The language most people speak in {b} is",
]
CONTINENT_HOP2 = [
    "{B} is located on the continent of",
    "{B} is a country on the continent of",
    "{B} is part of the continent of",
]
BIRTH_HOP2 = [
    "{B} was born in the country of",
    "The country where {b} was born is",
    "{B_poss} country of birth is",
]

TEMPLATES = {
    "landmark>country>capital": dict(
        hop1=LANDMARK_HOP1,
        hop2=CAPITAL_HOP2,
        composed=[
            "The capital of the country where {s} is located is",
            "The capital city of the country that is home to {s} is",
            "The capital of the country in which {s} stands is",
        ],
        para=[
            "{S} is located in a country whose capital is",
            "{S} stands in a country whose capital city is",
            "The country that contains {s} has its capital in the city of",
        ],
    ),
    "landmark>country>currency": dict(
        hop1=LANDMARK_HOP1,
        hop2=CURRENCY_HOP2,
        composed=[
            "The currency of the country where {s} is located is the",
            "The official currency of the country that is home to {s} is the",
            "The currency used in the country where {s} stands is the",
        ],
        para=[
            "In the country where {s} is located, people pay with the",
            "{S} is located in a country whose currency is the",
            "Tourists visiting {s} pay with the national currency, called the",
        ],
    ),
    "landmark>country>language": dict(
        hop1=LANDMARK_HOP1,
        hop2=LANGUAGE_HOP2,
        composed=[
            "The main language spoken in the country where {s} is located is",
            "In the country where {s} stands, most people speak",
            "The language most people speak in the country that is home to {s} is",
        ],
        para=[
            "{S} is located in a country where the main language is",
            "People who live in the country where {s} is located mostly speak",
            "The most widely spoken language in the country that contains {s} is",
        ],
    ),
    "person>country>capital": dict(
        hop1=[
            "{S} was born in the country of",
            "The country where {s} was born is",
            "{S_poss} country of birth is",
        ],
        hop2=CAPITAL_HOP2,
        composed=[
            "The capital of the country where {s} was born is",
            "The capital city of {s_poss} country of birth is",
            "The capital of {s_poss} birth country is",
        ],
        para=[
            "{S} was born in a country whose capital is",
            "The country where {s} was born has its capital in the city of",
            "{S} came from a country whose capital city is",
        ],
    ),
    "company>country>capital": dict(
        hop1=[
            "{S} is headquartered in the country of",
            "The headquarters of {s} are in the country of",
            "{S} is a company based in the country of",
        ],
        hop2=CAPITAL_HOP2,
        composed=[
            "The capital of the country where {s} is headquartered is",
            "The capital city of the country where {s} is based is",
            "The capital of the home country of {s} is",
        ],
        para=[
            "{S} is headquartered in a country whose capital is",
            "{S} is based in a country whose capital city is",
            "The country where {s} has its headquarters has its capital in the city of",
        ],
    ),
    "city>country>continent": dict(
        hop1=[
            "{S} is a city in the country of",
            "{S} is located in the country of",
            "The city of {s} is in the country of",
        ],
        hop2=CONTINENT_HOP2,
        composed=[
            "The country where {s} is located is on the continent of",
            "The continent of the country that contains {s} is",
            "The country that {s} belongs to is located on the continent of",
        ],
        para=[
            "{S} is in a country that lies on the continent of",
            "The country in which the city of {s} is located is part of the continent of",
            "{S_poss} country is located on the continent of",
        ],
    ),
    "dish>country>capital": dict(
        hop1=[
            "{S} is a dish that originated in the country of",
            "{S} originally comes from the country of",
            "The country where {s} originated is",
        ],
        hop2=CAPITAL_HOP2,
        composed=[
            "The capital of the country where {s} originated is",
            "The capital city of the country that {s} comes from is",
            "The capital of {s_poss} country of origin is",
        ],
        para=[
            "{S} comes from a country whose capital is",
            "{S} originated in a country whose capital city is",
            "The country that gave the world {s} has its capital in the city of",
        ],
    ),
}

# Works: one template family per role (the second hop is always BIRTH_HOP2).
WORK_ROLES = {
    "book": dict(
        hop1=["{S} was written by", "The author of {s} was", "{S} is a famous work by"],
        composed=[
            "The author of {s} was born in the country of",
            "The person who wrote {s} was born in the country of",
            "The country in which the author of {s} was born is",
        ],
        para=[
            "The writer of {s} was born in the country of",
            "{S} was written by an author who was born in the country of",
            "{S} is the work of an author born in the country of",
        ],
    ),
    "play": dict(
        hop1=["{S} was written by", "The author of {s} was", "The play {s} was written by"],
        composed=[
            "The author of {s} was born in the country of",
            "The playwright who wrote {s} was born in the country of",
            "The country in which the author of {s} was born is",
        ],
        para=[
            "The writer of the play {s} was born in the country of",
            "{S} was written by a playwright who was born in the country of",
            "{S} is the work of a playwright born in the country of",
        ],
    ),
    "painting": dict(
        hop1=["{S} was painted by", "The painter of {s} was", "The artist who painted {s} was"],
        composed=[
            "The painter of {s} was born in the country of",
            "The artist who painted {s} was born in the country of",
            "The country where the painter of {s} was born is",
        ],
        para=[
            "{S} was painted by an artist who was born in the country of",
            "The person who painted {s} was born in the country of",
            "The country in which the artist behind {s} was born is",
        ],
    ),
    "sculpture": dict(
        hop1=["{S} was sculpted by", "The sculptor of {s} was", "The artist who made {s} was"],
        composed=[
            "The sculptor of {s} was born in the country of",
            "The artist who sculpted {s} was born in the country of",
            "The country where the sculptor of {s} was born is",
        ],
        para=[
            "{S} was made by a sculptor who was born in the country of",
            "The person who sculpted {s} was born in the country of",
            "The country in which the artist behind {s} was born is",
        ],
    ),
    "music": dict(
        hop1=["{S} was composed by", "The composer of {s} was", "{S} is a famous work by"],
        composed=[
            "The composer of {s} was born in the country of",
            "The person who composed {s} was born in the country of",
            "The country where the composer of {s} was born is",
        ],
        para=[
            "{S} was composed by someone who was born in the country of",
            "The composer who wrote {s} was born in the country of",
            "{S} is the work of a composer born in the country of",
        ],
    ),
}

# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def with_article(name: str, article: str) -> str:
    return f"{article} {name}" if article else name


def possessive(text: str) -> str:
    return text + ("'" if text.endswith("s") else "'s")


def dedupe(items):
    out = []
    for x in items:
        if x and x not in out:
            out.append(x)
    return out


def fill(template: str, subj: str, bridge: str) -> str:
    return template.format(
        s=subj,
        S=cap(subj),
        s_poss=possessive(subj),
        S_poss=cap(possessive(subj)),
        b=bridge,
        B=cap(bridge),
        B_poss=cap(possessive(bridge)),
    )


def make_item(
    idx, kind, id_prefix, tpl, subject, subj_phrase, bridge, bridge_phrase, bridge_aliases, answer, answer_aliases
):
    """Fill the templates for one item; variant choice rotates with idx."""
    composed_t = tpl["composed"][idx % len(tpl["composed"])]
    pool = [t for t in tpl["composed"] + tpl["para"] if t != composed_t]
    paras = [pool[(idx + k) % len(pool)] for k in range(3)]
    return {
        "id": f"{id_prefix}-{idx:04d}",
        "kind": kind,
        "subject": subject,
        "bridge": bridge,
        "answer": answer,
        "hop1": fill(tpl["hop1"][idx % len(tpl["hop1"])], subj_phrase, bridge_phrase),
        "hop2": fill(tpl["hop2"][(idx // len(tpl["hop1"])) % len(tpl["hop2"])], subj_phrase, bridge_phrase),
        "composed": fill(composed_t, subj_phrase, bridge_phrase),
        "paraphrases": [fill(t, subj_phrase, bridge_phrase) for t in paras],
        "answer_aliases": dedupe([answer, *answer_aliases]),
        "bridge_aliases": dedupe([bridge, *bridge_aliases]),
    }


def country_bridge(cname):
    c = COUNTRIES[cname]
    return c["name"], with_article(c["name"], c["article"]), c["aliases"]


def build_country_kind(kind, id_prefix, rows, attribute):
    """rows: (subject, article, country).  attribute: capital/currency/...."""
    tpl = TEMPLATES[kind]
    items = []
    for subject, article, cname in rows:
        fact = COUNTRIES[cname][attribute]
        if fact is None:  # ambiguous / not asked for this country
            continue
        bridge, bridge_phrase, b_aliases = country_bridge(cname)
        answer, a_aliases = fact
        items.append(
            make_item(
                len(items),
                kind,
                id_prefix,
                tpl,
                subject,
                with_article(subject, article),
                bridge,
                bridge_phrase,
                b_aliases,
                answer,
                a_aliases,
            )
        )
    return items


def build_works():
    kind, id_prefix = "work>creator>birth-country", "work-birthcountry"
    items = []
    for title, role, creator in WORKS:
        cname, creator_aliases = CREATORS[creator]
        c = COUNTRIES[cname]
        tpl = dict(WORK_ROLES[role], hop2=BIRTH_HOP2)
        # Titles keep their own capitalisation ("The Starry Night").
        items.append(
            make_item(
                len(items),
                kind,
                id_prefix,
                tpl,
                title.removeprefix("the "),
                title,
                creator,
                creator,
                creator_aliases,
                c["name"],
                c["aliases"],
            )
        )
    return items


def build_all():
    items = []
    items += build_country_kind("landmark>country>capital", "landmark-capital", LANDMARKS, "capital")
    items += build_country_kind("landmark>country>currency", "landmark-currency", LANDMARKS, "currency")
    items += build_country_kind("landmark>country>language", "landmark-language", LANDMARKS, "language")
    items += build_country_kind("person>country>capital", "person-capital", [(n, "", c) for n, c in PEOPLE], "capital")
    items += build_country_kind(
        "company>country>capital", "company-capital", [(n, "", c) for n, c in COMPANIES], "capital"
    )
    items += build_country_kind(
        "city>country>continent", "city-continent", [(n, "", c) for n, c in CITIES], "continent"
    )
    items += build_country_kind("dish>country>capital", "dish-capital", [(n, "", c) for n, c in DISHES], "capital")
    items += build_works()
    return items


def main(argv):
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    items = build_all()
    ids = [it["id"] for it in items]
    assert len(ids) == len(set(ids)), "duplicate ids"
    with out.open("w", encoding="utf-8", newline="\n") as fh:
        for it in items:
            fh.write(json.dumps(it, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {out}")


if __name__ == "__main__":
    main(sys.argv)
