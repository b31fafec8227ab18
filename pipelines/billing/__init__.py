"""Billing: the price book, monthly invoicing, payments, outages, credit notes and usage limits."""
