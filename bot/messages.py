# ruff: noqa: E501  (one translation per line reads, and reviews, better than wrapped fragments)
"""Every text a customer reads, in the ten languages the bot detects, and how one is chosen.

`CATALOG` maps a key to {ISO 639-1 code: text}. Placeholders (`{n}`, `{when}`…) are the same in
every language (tests/bot/test_messages.py checks). The English texts are the bot's original words.

The language of a reply: the sender's language as the channel reports it (Telegram's
`language_code`), else the language the message is written in (knowledge/language.py, among the
catalog's languages), else `APPRENTICE_LANGUAGE`. Operators replace any text with
`APPRENTICE_MESSAGES`, a JSON or YAML file of `{key: {lang: text}}` (or `{key: text}`: that text in
every language), merged over the catalog. `APPRENTICE_START_TEXT`, when changed from its default,
is the /start greeting in every language (a `start` entry in the messages file wins over it).

Only notices are localised: the model's answers are in the language the model writes (the bundled
SmolLM2-135M writes English).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import string
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from knowledge import language
from knowledge.settings import ConfigError, Settings

LANGUAGES = ("en", "es", "pt", "de", "fr", "ru", "uk", "tr", "ar", "fa")
# Detection needs some words: with fewer letters the message says nothing about its language.
MIN_DETECT_LETTERS = 8
MIN_DISTINCT_LETTERS = 5
# lingua's confidence (0..1) needed: real questions score 0.65 and up, keyboard mashing below 0.55
MIN_CONFIDENCE = 0.6

CATALOG: dict[str, dict[str, str]] = {
    "unsure": {
        "en": "I'm not sure about that one, so I've passed your question to a colleague who will follow up shortly.",
        "es": "No estoy seguro de eso, así que he pasado su pregunta a un compañero que le responderá en breve.",
        "pt": "Não tenho certeza sobre isso, por isso encaminhei a sua pergunta a um colega, que responderá em breve.",
        "de": "Da bin ich mir nicht sicher, deshalb habe ich Ihre Frage an unser Team weitergegeben. Wir melden uns in Kürze bei Ihnen.",
        "fr": "Je ne suis pas sûr de la réponse, j'ai donc transmis votre question à un collègue qui vous répondra très bientôt.",
        "ru": "Я не уверен в ответе, поэтому передал ваш вопрос коллеге — он скоро с вами свяжется.",
        "uk": "Я не впевнений у відповіді, тому передав ваше запитання колезі — він незабаром з вами зв'яжеться.",
        "tr": "Bu konuda emin değilim, bu yüzden sorunuzu bir çalışma arkadaşıma ilettim; kısa süre içinde size dönüş yapacak.",
        "ar": "لست متأكدًا من ذلك، لذا أحلت سؤالك إلى أحد الزملاء وسيتابع معك قريبًا.",
        "fa": "درباره‌ی این مورد مطمئن نیستم، برای همین سؤال شما را به یکی از همکارانم سپردم که به‌زودی پیگیری می‌کند.",
    },
    # outside business hours (APPRENTICE_BUSINESS_HOURS): {when} is a "when" phrase below
    "unsure_later": {
        "en": "I'm not sure about that one, so I've passed your question to a colleague. Our team is away right now. A colleague will reply {when}.",
        "es": "No estoy seguro de eso, así que he pasado su pregunta a un compañero. Ahora mismo nuestro equipo no está disponible. Un compañero le responderá {when}.",
        "pt": "Não tenho certeza sobre isso, por isso encaminhei a sua pergunta a um colega. A nossa equipe não está disponível neste momento. Um colega responderá {when}.",
        "de": "Da bin ich mir nicht sicher, deshalb habe ich Ihre Frage an unser Team weitergegeben. Wir sind gerade nicht erreichbar. Jemand aus dem Team antwortet Ihnen {when}.",
        "fr": "Je ne suis pas sûr de la réponse, j'ai donc transmis votre question à un collègue. Notre équipe est absente pour le moment. Un collègue vous répondra {when}.",
        "ru": "Я не уверен в ответе, поэтому передал ваш вопрос коллеге. Сейчас наша команда не работает. Коллега ответит вам {when}.",
        "uk": "Я не впевнений у відповіді, тому передав ваше запитання колезі. Зараз наша команда не працює. Колега відповість вам {when}.",
        "tr": "Bu konuda emin değilim, bu yüzden sorunuzu bir çalışma arkadaşıma ilettim. Ekibimiz şu anda mesai dışında. Bir çalışma arkadaşım {when} size yanıt verecek.",
        "ar": "لست متأكدًا من ذلك، لذا أحلت سؤالك إلى أحد الزملاء. فريقنا غير متاح حاليًا. سيرد عليك أحد الزملاء {when}.",
        "fa": "درباره‌ی این مورد مطمئن نیستم، برای همین سؤال شما را به یکی از همکارانم سپردم. تیم ما در حال حاضر در دسترس نیست. یکی از همکاران {when} به شما پاسخ می‌دهد.",
    },
    "apology": {
        "en": "Sorry, I couldn't answer just now. A colleague has been notified and will get back to you.",
        "es": "Lo siento, no he podido responder ahora mismo. Hemos avisado a un compañero, que se pondrá en contacto con usted.",
        "pt": "Desculpe, não consegui responder agora. Um colega foi avisado e entrará em contato com você.",
        "de": "Entschuldigung, ich konnte gerade nicht antworten. Unser Team wurde benachrichtigt und meldet sich bei Ihnen.",
        "fr": "Désolé, je n'ai pas pu répondre pour le moment. Un collègue a été prévenu et reviendra vers vous.",
        "ru": "Извините, сейчас я не смог ответить. Мы уже сообщили коллеге, и он с вами свяжется.",
        "uk": "Вибачте, зараз я не зміг відповісти. Ми вже повідомили колегу, і він з вами зв'яжеться.",
        "tr": "Üzgünüm, şu anda yanıt veremedim. Bir çalışma arkadaşıma haber verildi, size dönüş yapacak.",
        "ar": "عذرًا، لم أتمكن من الإجابة الآن. تم إبلاغ أحد الزملاء وسيتواصل معك.",
        "fa": "متأسفم، الان نتوانستم پاسخ بدهم. به یکی از همکاران اطلاع داده شد و با شما تماس می‌گیرد.",
    },
    "busy": {
        "en": "We're answering a lot of customers right now. Please send your question again in a minute.",
        "es": "Ahora mismo estamos atendiendo a muchos clientes. Por favor, vuelva a enviar su pregunta en un minuto.",
        "pt": "Estamos atendendo muitos clientes neste momento. Por favor, envie a sua pergunta novamente daqui a um minuto.",
        "de": "Wir beantworten gerade sehr viele Anfragen. Bitte senden Sie Ihre Frage in einer Minute noch einmal.",
        "fr": "Nous répondons à de nombreux clients en ce moment. Veuillez renvoyer votre question dans une minute.",
        "ru": "Сейчас у нас очень много обращений. Пожалуйста, отправьте вопрос ещё раз через минуту.",
        "uk": "Зараз у нас дуже багато звернень. Будь ласка, надішліть запитання ще раз за хвилину.",
        "tr": "Şu anda çok sayıda müşteriye yanıt veriyoruz. Lütfen sorunuzu bir dakika sonra tekrar gönderin.",
        "ar": "نرد على عدد كبير من العملاء في الوقت الحالي. يُرجى إرسال سؤالك مرة أخرى بعد دقيقة.",
        "fa": "در حال حاضر به مشتریان زیادی پاسخ می‌دهیم. لطفاً یک دقیقه دیگر دوباره سؤالتان را بفرستید.",
    },
    "too_long": {
        "en": "Sorry, that message is too long for me ({n} characters). Please keep it under {limit} characters.",
        "es": "Lo siento, ese mensaje es demasiado largo para mí ({n} caracteres). Por favor, no supere los {limit} caracteres.",
        "pt": "Desculpe, essa mensagem é longa demais para mim ({n} caracteres). Por favor, use menos de {limit} caracteres.",
        "de": "Entschuldigung, diese Nachricht ist zu lang für mich ({n} Zeichen). Bitte bleiben Sie unter {limit} Zeichen.",
        "fr": "Désolé, ce message est trop long pour moi ({n} caractères). Veuillez ne pas dépasser {limit} caractères.",
        "ru": "Извините, это сообщение слишком длинное (символов: {n}, допустимо не более {limit}). Пожалуйста, сократите его.",
        "uk": "Вибачте, це повідомлення задовге (символів: {n}, допустимо не більше {limit}). Будь ласка, скоротіть його.",
        "tr": "Üzgünüm, bu mesaj benim için çok uzun ({n} karakter). Lütfen {limit} karakterin altında tutun.",
        "ar": "عذرًا، هذه الرسالة أطول مما أستطيع قراءته (عدد الأحرف: {n}، والحد الأقصى: {limit}). يُرجى اختصارها.",
        "fa": "متأسفم، این پیام برای من بیش از حد طولانی است ({n} نویسه). لطفاً آن را کمتر از {limit} نویسه نگه دارید.",
    },
    "empty": {
        "en": "It looks like your message was empty. What can I help you with?",
        "es": "Parece que su mensaje estaba vacío. ¿En qué puedo ayudarle?",
        "pt": "Parece que a sua mensagem estava vazia. Como posso ajudar?",
        "de": "Ihre Nachricht scheint leer zu sein. Wie kann ich Ihnen helfen?",
        "fr": "Votre message semble vide. Comment puis-je vous aider ?",
        "ru": "Похоже, ваше сообщение пустое. Чем я могу помочь?",
        "uk": "Схоже, ваше повідомлення порожнє. Чим я можу допомогти?",
        "tr": "Mesajınız boş görünüyor. Size nasıl yardımcı olabilirim?",
        "ar": "يبدو أن رسالتك فارغة. كيف يمكنني مساعدتك؟",
        "fa": "به نظر می‌رسد پیام شما خالی بود. چطور می‌توانم کمکتان کنم؟",
    },
    # photos, stickers, voice, documents, locations…
    "non_text": {
        "en": "Sorry, I can only read text messages for now. Please type your question.",
        "es": "Lo siento, por ahora solo puedo leer mensajes de texto. Por favor, escriba su pregunta.",
        "pt": "Desculpe, por enquanto só consigo ler mensagens de texto. Por favor, escreva a sua pergunta.",
        "de": "Entschuldigung, ich kann im Moment nur Textnachrichten lesen. Bitte schreiben Sie Ihre Frage.",
        "fr": "Désolé, je ne peux lire que des messages texte pour le moment. Veuillez écrire votre question.",
        "ru": "Извините, пока я умею читать только текстовые сообщения. Пожалуйста, напишите свой вопрос.",
        "uk": "Вибачте, поки що я вмію читати лише текстові повідомлення. Будь ласка, напишіть своє запитання.",
        "tr": "Üzgünüm, şimdilik yalnızca metin mesajlarını okuyabiliyorum. Lütfen sorunuzu yazın.",
        "ar": "عذرًا، لا يمكنني قراءة سوى الرسائل النصية حاليًا. يُرجى كتابة سؤالك.",
        "fa": "متأسفم، فعلاً فقط می‌توانم پیام‌های متنی را بخوانم. لطفاً سؤالتان را بنویسید.",
    },
    # the rate limit (APPRENTICE_RATE_LIMIT_PER_MINUTE)
    "slow_down": {
        "en": "You're sending messages faster than I can answer. Please wait a moment and try again.",
        "es": "Está enviando mensajes más rápido de lo que puedo responder. Por favor, espere un momento y vuelva a intentarlo.",
        "pt": "Você está enviando mensagens mais rápido do que consigo responder. Por favor, aguarde um momento e tente novamente.",
        "de": "Sie senden Nachrichten schneller, als ich antworten kann. Bitte warten Sie einen Moment und versuchen Sie es dann erneut.",
        "fr": "Vous envoyez des messages plus vite que je ne peux répondre. Veuillez patienter un instant et réessayer.",
        "ru": "Вы отправляете сообщения быстрее, чем я успеваю отвечать. Пожалуйста, подождите немного и попробуйте снова.",
        "uk": "Ви надсилаєте повідомлення швидше, ніж я встигаю відповідати. Будь ласка, зачекайте трохи й спробуйте знову.",
        "tr": "Yanıtlayabileceğimden daha hızlı mesaj gönderiyorsunuz. Lütfen biraz bekleyip tekrar deneyin.",
        "ar": "أنت ترسل الرسائل أسرع مما أستطيع الرد عليها. يُرجى الانتظار قليلًا ثم المحاولة مرة أخرى.",
        "fa": "شما سریع‌تر از آنچه بتوانم پاسخ بدهم پیام می‌فرستید. لطفاً کمی صبر کنید و دوباره امتحان کنید.",
    },
    # /human, or "can I talk to a person?" in any words
    "human": {
        "en": "Thanks, I've asked a colleague to join. Someone will reply here as soon as possible.",
        "es": "Gracias, he pedido a un compañero que se una. Alguien le responderá aquí lo antes posible.",
        "pt": "Obrigado, pedi a um colega que participe. Alguém responderá aqui o mais rápido possível.",
        "de": "Danke, ich habe unser Team dazugeholt. Jemand antwortet Ihnen hier so bald wie möglich.",
        "fr": "Merci, j'ai demandé à un collègue de nous rejoindre. Quelqu'un vous répondra ici dès que possible.",
        "ru": "Спасибо, я позвал коллегу. Вам ответят здесь как можно скорее.",
        "uk": "Дякую, я покликав колегу. Вам відповідять тут якнайшвидше.",
        "tr": "Teşekkürler, bir çalışma arkadaşımdan konuşmaya katılmasını istedim. En kısa sürede burada size yanıt verilecek.",
        "ar": "شكرًا، لقد طلبت من أحد الزملاء الانضمام. سيرد عليك أحدهم هنا في أقرب وقت ممكن.",
        "fa": "ممنون، از یکی از همکارانم خواستم به گفتگو بپیوندد. در اسرع وقت کسی همین‌جا به شما پاسخ می‌دهد.",
    },
    "human_later": {
        "en": "Thanks, I've asked a colleague to join. Our team is away right now. A colleague will reply {when}.",
        "es": "Gracias, he pedido a un compañero que se una. Ahora mismo nuestro equipo no está disponible. Un compañero le responderá {when}.",
        "pt": "Obrigado, pedi a um colega que participe. A nossa equipe não está disponível neste momento. Um colega responderá {when}.",
        "de": "Danke, ich habe unser Team dazugeholt. Wir sind gerade nicht erreichbar. Jemand aus dem Team antwortet Ihnen {when}.",
        "fr": "Merci, j'ai demandé à un collègue de nous rejoindre. Notre équipe est absente pour le moment. Un collègue vous répondra {when}.",
        "ru": "Спасибо, я позвал коллегу. Сейчас наша команда не работает. Коллега ответит вам {when}.",
        "uk": "Дякую, я покликав колегу. Зараз наша команда не працює. Колега відповість вам {when}.",
        "tr": "Teşekkürler, bir çalışma arkadaşımdan konuşmaya katılmasını istedim. Ekibimiz şu anda mesai dışında. Bir çalışma arkadaşım {when} size yanıt verecek.",
        "ar": "شكرًا، لقد طلبت من أحد الزملاء الانضمام. فريقنا غير متاح حاليًا. سيرد عليك أحد الزملاء {when}.",
        "fa": "ممنون، از یکی از همکارانم خواستم به گفتگو بپیوندد. تیم ما در حال حاضر در دسترس نیست. یکی از همکاران {when} به شما پاسخ می‌دهد.",
    },
    # {when} of the *_later texts: "{day} at {time}", the time in the business's time zone
    "when": {
        "en": "{day} at {time}",
        "es": "{day} a las {time}",
        "pt": "{day} às {time}",
        "de": "{day} um {time}",
        "fr": "{day} à {time}",
        "ru": "{day} в {time}",
        "uk": "{day} о {time}",
        "tr": "{day} saat {time} itibarıyla",
        "ar": "{day} الساعة {time}",
        "fa": "{day} ساعت {time}",
    },
    # {day} of "when": Monday … Sunday, today, tomorrow, separated by "|", as the sentence needs them
    "days": {
        "en": "on Monday|on Tuesday|on Wednesday|on Thursday|on Friday|on Saturday|on Sunday|today|tomorrow",
        "es": "el lunes|el martes|el miércoles|el jueves|el viernes|el sábado|el domingo|hoy|mañana",
        "pt": "na segunda-feira|na terça-feira|na quarta-feira|na quinta-feira|na sexta-feira|no sábado|no domingo|hoje|amanhã",
        "de": "am Montag|am Dienstag|am Mittwoch|am Donnerstag|am Freitag|am Samstag|am Sonntag|heute|morgen",
        "fr": "lundi|mardi|mercredi|jeudi|vendredi|samedi|dimanche|aujourd'hui|demain",
        "ru": "в понедельник|во вторник|в среду|в четверг|в пятницу|в субботу|в воскресенье|сегодня|завтра",
        "uk": "у понеділок|у вівторок|у середу|у четвер|у п'ятницю|у суботу|у неділю|сьогодні|завтра",
        "tr": "Pazartesi|Salı|Çarşamba|Perşembe|Cuma|Cumartesi|Pazar|bugün|yarın",
        "ar": "يوم الاثنين|يوم الثلاثاء|يوم الأربعاء|يوم الخميس|يوم الجمعة|يوم السبت|يوم الأحد|اليوم|غدًا",
        "fa": "دوشنبه|سه‌شنبه|چهارشنبه|پنجشنبه|جمعه|شنبه|یکشنبه|امروز|فردا",
    },
    # {day} of "when" a week or more ahead (holidays): {date} is YYYY-MM-DD
    "on_date": {
        "en": "on {date}",
        "es": "el {date}",
        "pt": "em {date}",
        "de": "am {date}",
        "fr": "le {date}",
        "ru": "{date}",
        "uk": "{date}",
        "tr": "{date}",
        "ar": "في {date}",
        "fa": "{date}",
    },
    # the output guard withheld the model's reply (bot/guard.py)
    "blocked": {
        "en": "Sorry, I can't share that. I've passed your message to a colleague who will follow up shortly.",
        "es": "Lo siento, no puedo compartir eso. He pasado su mensaje a un compañero que le responderá en breve.",
        "pt": "Desculpe, não posso compartilhar isso. Encaminhei a sua mensagem a um colega, que responderá em breve.",
        "de": "Entschuldigung, das kann ich nicht weitergeben. Ich habe Ihre Nachricht an unser Team weitergeleitet. Wir melden uns in Kürze bei Ihnen.",
        "fr": "Désolé, je ne peux pas partager cela. J'ai transmis votre message à un collègue qui vous répondra très bientôt.",
        "ru": "Извините, я не могу этим поделиться. Я передал ваше сообщение коллеге — он скоро с вами свяжется.",
        "uk": "Вибачте, я не можу цим поділитися. Я передав ваше повідомлення колезі — він незабаром з вами зв'яжеться.",
        "tr": "Üzgünüm, bunu paylaşamam. Mesajınızı bir çalışma arkadaşıma ilettim; kısa süre içinde size dönüş yapacak.",
        "ar": "عذرًا، لا يمكنني مشاركة ذلك. أحلت رسالتك إلى أحد الزملاء وسيتابع معك قريبًا.",
        "fa": "متأسفم، نمی‌توانم این را به اشتراک بگذارم. پیام شما را به یکی از همکارانم سپردم که به‌زودی پیگیری می‌کند.",
    },
    # replies to courtesies (bot/courtesy.py): "thanks!", "bye", a bare "ok" or 👍 ("hi" gets `start`)
    "welcome": {
        "en": "You're welcome! If anything else comes up, just ask.",
        "es": "¡De nada! Si necesita algo más, solo tiene que preguntar.",
        "pt": "De nada! Se precisar de mais alguma coisa, é só perguntar.",
        "de": "Gern geschehen! Wenn Sie noch etwas brauchen, fragen Sie einfach.",
        "fr": "Avec plaisir ! Si vous avez une autre question, n'hésitez pas.",
        "ru": "Пожалуйста! Если появятся другие вопросы, просто напишите.",
        "uk": "Будь ласка! Якщо з'являться інші запитання, просто напишіть.",
        "tr": "Rica ederim! Başka bir şeye ihtiyacınız olursa sormanız yeterli.",
        "ar": "على الرحب والسعة! إذا احتجت إلى أي شيء آخر، فقط اسأل.",
        "fa": "خواهش می‌کنم! اگر سؤال دیگری داشتید، کافی است بپرسید.",
    },
    "goodbye": {
        "en": "Goodbye, and thanks for getting in touch!",
        "es": "¡Hasta luego, y gracias por escribirnos!",
        "pt": "Até logo, e obrigado por entrar em contato!",
        "de": "Auf Wiedersehen und danke für Ihre Nachricht!",
        "fr": "Au revoir, et merci de nous avoir contactés !",
        "ru": "До свидания, спасибо, что написали!",
        "uk": "До побачення, дякуємо, що написали!",
        "tr": "Hoşça kalın, bize yazdığınız için teşekkürler!",
        "ar": "مع السلامة، وشكرًا لتواصلك معنا!",
        "fa": "خداحافظ، و ممنون که با ما در تماس بودید!",
    },
    "anything_else": {
        "en": "If anything else comes up, just ask.",
        "es": "Si necesita algo más, solo tiene que preguntar.",
        "pt": "Se precisar de mais alguma coisa, é só perguntar.",
        "de": "Wenn Sie noch etwas brauchen, fragen Sie einfach.",
        "fr": "Si vous avez une autre question, n'hésitez pas.",
        "ru": "Если появятся другие вопросы, просто напишите.",
        "uk": "Якщо з'являться інші запитання, просто напишіть.",
        "tr": "Başka bir şeye ihtiyacınız olursa sormanız yeterli.",
        "ar": "إذا احتجت إلى أي شيء آخر، فقط اسأل.",
        "fa": "اگر سؤال دیگری داشتید، کافی است بپرسید.",
    },
    "thanks_up": {
        "en": "Thanks for the feedback!",
        "es": "¡Gracias por su opinión!",
        "pt": "Obrigado pelo feedback!",
        "de": "Danke für Ihre Rückmeldung!",
        "fr": "Merci pour votre retour !",
        "ru": "Спасибо за отзыв!",
        "uk": "Дякуємо за відгук!",
        "tr": "Geri bildiriminiz için teşekkürler!",
        "ar": "شكرًا على ملاحظاتك!",
        "fa": "از بازخورد شما ممنونیم!",
    },
    "thanks_down": {
        "en": "Thanks for the feedback. A colleague will review this answer.",
        "es": "Gracias por su opinión. Un compañero revisará esta respuesta.",
        "pt": "Obrigado pelo feedback. Um colega vai rever esta resposta.",
        "de": "Danke für Ihre Rückmeldung. Unser Team prüft diese Antwort.",
        "fr": "Merci pour votre retour. Un collègue va examiner cette réponse.",
        "ru": "Спасибо за отзыв. Коллега проверит этот ответ.",
        "uk": "Дякуємо за відгук. Колега перевірить цю відповідь.",
        "tr": "Geri bildiriminiz için teşekkürler. Bir çalışma arkadaşım bu yanıtı inceleyecek.",
        "ar": "شكرًا على ملاحظاتك. سيراجع أحد الزملاء هذه الإجابة.",
        "fa": "از بازخورد شما ممنونیم. یکی از همکاران این پاسخ را بررسی می‌کند.",
    },
    "already_rated": {
        "en": "You already rated this answer. Thanks!",
        "es": "Ya ha valorado esta respuesta. ¡Gracias!",
        "pt": "Você já avaliou esta resposta. Obrigado!",
        "de": "Sie haben diese Antwort bereits bewertet. Danke!",
        "fr": "Vous avez déjà évalué cette réponse. Merci !",
        "ru": "Вы уже оценили этот ответ. Спасибо!",
        "uk": "Ви вже оцінили цю відповідь. Дякуємо!",
        "tr": "Bu yanıtı zaten değerlendirdiniz. Teşekkürler!",
        "ar": "لقد قيّمت هذه الإجابة بالفعل. شكرًا!",
        "fa": "شما قبلاً به این پاسخ امتیاز داده‌اید. ممنون!",
    },
    # /start (APPRENTICE_START_TEXT, when set, replaces it in every language)
    "start": {
        "en": "Hello! I am the support assistant. Ask me anything about our products and services.",
        "es": "¡Hola! Soy el asistente de atención al cliente. Pregúnteme lo que quiera sobre nuestros productos y servicios.",
        "pt": "Olá! Sou o assistente de suporte. Pergunte o que quiser sobre os nossos produtos e serviços.",
        "de": "Hallo! Ich bin der Support-Assistent. Fragen Sie mich alles zu unseren Produkten und Dienstleistungen.",
        "fr": "Bonjour ! Je suis l'assistant du service client. Posez-moi toutes vos questions sur nos produits et services.",
        "ru": "Здравствуйте! Я помощник службы поддержки. Спрашивайте что угодно о наших товарах и услугах.",
        "uk": "Вітаю! Я помічник служби підтримки. Запитуйте будь-що про наші товари та послуги.",
        "tr": "Merhaba! Ben destek asistanıyım. Ürünlerimiz ve hizmetlerimiz hakkında bana istediğinizi sorabilirsiniz.",
        "ar": "مرحبًا! أنا مساعد الدعم. اسألني عن أي شيء يخص منتجاتنا وخدماتنا.",
        "fa": "سلام! من دستیار پشتیبانی هستم. هر سؤالی درباره‌ی محصولات و خدمات ما دارید بپرسید.",
    },
    # /help
    "help": {
        "en": "Ask me anything about our products and services and I'll answer from our help pages.\n\nUnder each answer you can tap 👍 or 👎 to tell us whether it helped.\nSend /human to talk to a person.",
        "es": "Pregúnteme lo que quiera sobre nuestros productos y servicios y le responderé a partir de nuestras páginas de ayuda.\n\nDebajo de cada respuesta puede pulsar 👍 o 👎 para decirnos si le ha sido útil.\nEnvíe /human para hablar con una persona.",
        "pt": "Pergunte o que quiser sobre os nossos produtos e serviços e eu responderei com base nas nossas páginas de ajuda.\n\nAbaixo de cada resposta, você pode tocar em 👍 ou 👎 para nos dizer se ajudou.\nEnvie /human para falar com uma pessoa.",
        "de": "Fragen Sie mich alles zu unseren Produkten und Dienstleistungen, ich antworte anhand unserer Hilfeseiten.\n\nUnter jeder Antwort können Sie 👍 oder 👎 antippen, um uns zu sagen, ob sie geholfen hat.\nSenden Sie /human, um mit einem Menschen zu sprechen.",
        "fr": "Posez-moi toutes vos questions sur nos produits et services, je vous répondrai à partir de nos pages d'aide.\n\nSous chaque réponse, vous pouvez appuyer sur 👍 ou 👎 pour nous dire si elle vous a aidé.\nEnvoyez /human pour parler à une personne.",
        "ru": "Задайте любой вопрос о наших товарах и услугах, и я отвечу по материалам наших справочных страниц.\n\nПод каждым ответом можно нажать 👍 или 👎, чтобы сказать, помог ли он.\nОтправьте /human, чтобы поговорить с человеком.",
        "uk": "Поставте будь-яке запитання про наші товари та послуги, і я відповім за матеріалами наших довідкових сторінок.\n\nПід кожною відповіддю можна натиснути 👍 або 👎, щоб повідомити, чи вона допомогла.\nНадішліть /human, щоб поговорити з людиною.",
        "tr": "Ürünlerimiz ve hizmetlerimiz hakkında bana istediğinizi sorun, yardım sayfalarımıza dayanarak yanıtlayayım.\n\nHer yanıtın altında 👍 veya 👎 simgesine dokunarak işinize yarayıp yaramadığını bize bildirebilirsiniz.\nBir kişiyle konuşmak için /human gönderin.",
        "ar": "اسألني عن أي شيء يخص منتجاتنا وخدماتنا وسأجيبك من صفحات المساعدة لدينا.\n\nأسفل كل إجابة يمكنك الضغط على 👍 أو 👎 لتخبرنا إن كانت مفيدة.\nأرسل /human للتحدث مع شخص.",
        "fa": "هر سؤالی درباره‌ی محصولات و خدمات ما دارید بپرسید تا از روی صفحه‌های راهنمای ما پاسخ بدهم.\n\nزیر هر پاسخ می‌توانید 👍 یا 👎 را بزنید تا بگویید مفید بود یا نه.\nبرای گفتگو با یک شخص، /human را بفرستید.",
    },
    # customer satisfaction: the question after a conversation, and its two buttons
    "csat_question": {
        "en": "Did this solve your problem?",
        "es": "¿Se ha resuelto su problema?",
        "pt": "Isso resolveu o seu problema?",
        "de": "Konnte Ihr Problem damit gelöst werden?",
        "fr": "Cela a-t-il résolu votre problème ?",
        "ru": "Это решило вашу проблему?",
        "uk": "Це вирішило вашу проблему?",
        "tr": "Bu, sorununuzu çözdü mü?",
        "ar": "هل حلّ هذا مشكلتك؟",
        "fa": "آیا این مشکل شما را حل کرد؟",
    },
    "csat_yes": {
        "en": "Yes",
        "es": "Sí",
        "pt": "Sim",
        "de": "Ja",
        "fr": "Oui",
        "ru": "Да",
        "uk": "Так",
        "tr": "Evet",
        "ar": "نعم",
        "fa": "بله",
    },
    "csat_no": {
        "en": "No",
        "es": "No",
        "pt": "Não",
        "de": "Nein",
        "fr": "Non",
        "ru": "Нет",
        "uk": "Ні",
        "tr": "Hayır",
        "ar": "لا",
        "fa": "خیر",
    },
    "csat_thanks_yes": {
        "en": "Great, glad I could help!",
        "es": "¡Perfecto, me alegro de haberle ayudado!",
        "pt": "Ótimo, fico feliz por ter ajudado!",
        "de": "Prima, schön, dass ich helfen konnte!",
        "fr": "Parfait, ravi d'avoir pu vous aider !",
        "ru": "Отлично, рад, что смог помочь!",
        "uk": "Чудово, радий, що зміг допомогти!",
        "tr": "Harika, yardımcı olabildiğime sevindim!",
        "ar": "رائع، يسعدني أنني استطعت المساعدة!",
        "fa": "عالی است، خوشحالم که توانستم کمک کنم!",
    },
    "csat_thanks_no": {
        "en": "Sorry about that. I've asked a colleague to look at your conversation.",
        "es": "Lo siento. He pedido a un compañero que revise su conversación.",
        "pt": "Sinto muito. Pedi a um colega que analise a sua conversa.",
        "de": "Das tut mir leid. Ich habe unser Team gebeten, sich Ihr Gespräch anzusehen.",
        "fr": "Désolé. J'ai demandé à un collègue d'examiner votre conversation.",
        "ru": "Очень жаль. Я попросил коллегу посмотреть нашу переписку.",
        "uk": "Шкода. Я попросив колегу переглянути наше листування.",
        "tr": "Bunun için üzgünüm. Bir çalışma arkadaşımdan konuşmanızı incelemesini istedim.",
        "ar": "نأسف لذلك. طلبت من أحد الزملاء الاطلاع على محادثتك.",
        "fa": "متأسفم. از یکی از همکارانم خواستم گفتگوی شما را بررسی کند.",
    },
}


def placeholders(text: str) -> set[str]:
    """The `{name}` fields of a text."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def normalise(code: str | None) -> str:
    """ "pt-br", "PT_BR", "pt" -> "pt"; "" for nothing."""
    return re.split(r"[-_]", (code or "").strip().lower(), maxsplit=1)[0]


class Messages:
    """The catalog with the operator's overrides, and the default language."""

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        default: str = language.DEFAULT,
    ) -> None:
        self.texts: dict[str, dict[str, str]] = {k: dict(v) for k, v in CATALOG.items()}
        for key, by_lang in (overrides or {}).items():
            self.texts.setdefault(key, {}).update(by_lang)
        self.default = normalise(default) or language.DEFAULT

    @classmethod
    def from_settings(cls, settings: Settings) -> Messages:
        """The catalog as configured: APPRENTICE_START_TEXT, then the APPRENTICE_MESSAGES file, over it.

        Raises ConfigError naming the setting for a file that cannot be read or does not fit.
        """
        overrides: dict[str, dict[str, str]] = {}
        start_default = Settings.model_fields["start_text"].default
        if settings.start_text and settings.start_text != start_default:
            overrides["start"] = dict.fromkeys(LANGUAGES, settings.start_text)
        for key, by_lang in load_overrides(settings.messages).items():
            overrides.setdefault(key, {}).update(by_lang)
        return cls(overrides, settings.language)

    @property
    def languages(self) -> set[str]:
        return {lang for by_lang in self.texts.values() for lang in by_lang}

    def text(self, key: str, lang: str = "", **values: Any) -> str:
        """The text of `key` in `lang` (else the default language, else English), filled in."""
        by_lang = self.texts[key]
        template = by_lang.get(normalise(lang)) or by_lang.get(self.default) or by_lang["en"]
        return template.format(**values) if values else template

    def choose(self, code: str | None, text: str | None = None, written: str = "") -> str:
        """The reply language: the channel's `code` (Telegram's language_code) when we have texts in
        it, else the language `text` is written in (`written` when the caller knows it: a courtesy
        phrase's, bot/courtesy.py), else the default (APPRENTICE_LANGUAGE)."""
        lang = normalise(code)
        if lang and lang in self.languages:
            return lang
        detected = written or detect(text or "")
        return detected or self.default

    def when(self, lang: str, opening: dt.datetime, now: dt.datetime) -> str:
        """ "on Monday at 09:00", "today at 14:00", "tomorrow at 09:00", "on 2026-12-28 at 09:00":
        the opening in the business's zone (`opening`'s tzinfo), relative to `now`."""
        days = self.text("days", lang).split("|")
        local_now = now.astimezone(opening.tzinfo) if now.tzinfo is not None else now
        ahead = (opening.date() - local_now.date()).days
        if ahead == 0 and len(days) > 7:
            day = days[7]
        elif ahead == 1 and len(days) > 8:
            day = days[8]
        elif 1 < ahead < 7 and len(days) >= 7:
            day = days[opening.weekday()]
        else:
            day = self.text("on_date", lang, date=opening.date().isoformat())
        return self.text("when", lang, day=day, time=opening.strftime("%H:%M"))

    @cached_property
    def _patterns(self) -> dict[str, re.Pattern[str]]:
        out = {}
        for key, by_lang in self.texts.items():
            alternatives = []
            for template in by_lang.values():
                parts = [
                    re.escape(lit) + ("(?s:.+)" if name else "")
                    for lit, name, _, _ in string.Formatter().parse(template)
                ]
                alternatives.append("".join(parts))
            out[key] = re.compile("|".join(f"(?:{a})" for a in alternatives))
        return out

    def is_text(self, text: str, *keys: str) -> bool:
        """Whether `text` is one of `keys`' texts, in any language (placeholders match anything)."""
        return any(self._patterns[key].fullmatch(text) for key in keys if key in self._patterns)


def detect(text: str) -> str:
    """The language `text` is written in among the catalog's; "" when it is too short, gibberish
    ("zzzz zzzz" has too few different letters) or lingua is not confident enough."""
    letters = [ch for ch in text.casefold() if ch.isalpha()]
    if len(letters) < MIN_DETECT_LETTERS or len(set(letters)) < MIN_DISTINCT_LETTERS:
        return ""
    return language.detect_confident(text, LANGUAGES, MIN_CONFIDENCE)


def load_overrides(path: str) -> dict[str, dict[str, str]]:
    """The APPRENTICE_MESSAGES file as {key: {lang: text}}; {} when the setting is empty."""
    if not path:
        return {}
    where = Path(path).expanduser()
    try:
        raw = where.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"APPRENTICE_MESSAGES: cannot read {path!r} ({exc.strerror or exc}).") from None
    try:
        if where.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as exc:
        raise ConfigError(f"APPRENTICE_MESSAGES: {path!r} is not valid JSON or YAML ({exc}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"APPRENTICE_MESSAGES: {path!r} must hold a mapping of message keys.")
    out: dict[str, dict[str, str]] = {}
    for key, value in data.items():
        if key not in CATALOG:
            raise ConfigError(
                f"APPRENTICE_MESSAGES: unknown message key {key!r} in {path!r}; "
                f"the keys are: {', '.join(CATALOG)}."
            )
        if isinstance(value, str):
            value = dict.fromkeys(LANGUAGES, value)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(
                f"APPRENTICE_MESSAGES: {key!r} in {path!r} must be a text or a mapping of language "
                "codes (en, de, …) to texts."
            )
        expected = placeholders(CATALOG[key]["en"])
        for lang, text in value.items():
            try:
                found = placeholders(text)
            except ValueError as exc:  # a lone "{" or "}"
                raise ConfigError(f"APPRENTICE_MESSAGES: {key!r} ({lang}) in {path!r}: {exc}.") from None
            if found != expected:
                want = ", ".join(f"{{{p}}}" for p in sorted(expected)) or "none"
                raise ConfigError(
                    f"APPRENTICE_MESSAGES: {key!r} ({lang}) in {path!r} must use the placeholders "
                    f"{want}, not {', '.join(f'{{{p}}}' for p in sorted(found)) or 'none'}."
                )
            if key == "days" and len(text.split("|")) != 9:
                raise ConfigError(
                    f"APPRENTICE_MESSAGES: 'days' ({lang}) in {path!r} must list nine phrases separated "
                    "by '|': Monday … Sunday, today, tomorrow."
                )
            out.setdefault(key, {})[normalise(lang)] = text
    return out


__all__ = ["CATALOG", "LANGUAGES", "Messages", "detect", "load_overrides", "normalise", "placeholders"]
